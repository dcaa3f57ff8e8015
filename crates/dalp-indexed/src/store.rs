//! [`IndexedStore`]: the only code that touches schema `dalp_indexed`. Ingest is one
//! transaction per batch (binary COPY of every row, balances, supply and the checkpoint, plus
//! its audit record); a batch that diverges from the stored chain within the finality depth
//! rolls the stored chain back to the fork point first, in the same transaction.

use dalp_db::{TypedClient, WriteError, Writer};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;

use chrono::{DateTime, Datelike, Utc};
use dalp_audit::RequestContext;
use dalp_types::Invalid;
use deadpool_postgres::{Pool, Transaction};
use futures_util::pin_mut;
use num_bigint::{BigInt, Sign};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use crate::decode::{decode, Decoded};
use crate::numeric::Numeric;
use crate::types::{check_chain, hex0x, Address, Block, Hash};

/// The partitioned tables, in the order they are written.
pub const PARTITIONED: [&str; 4] = ["transactions", "logs", "transfers", "balance_history"];

const ZERO: Address = Address([0u8; 20]);

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("chain {0} is not registered; register it first (POST /api/v1/indexed/chains, or `dalp index follow`, which registers it)")]
    UnknownChain(i64),
    #[error("chain {0} is already registered with other settings")]
    ChainConflict(i64),
    #[error("gap: the batch starts at block {got} but chain {chain} is indexed up to block {indexed}; send blocks {} to {} first", indexed + 1, got - 1)]
    Gap { chain: i64, indexed: i64, got: i64 },
    #[error("parent hash of block {number} does not match the stored block {}: the chain reorganised below this batch; resend starting at the first block after the fork point", number - 1)]
    ParentMismatch { number: i64 },
    #[error("reorg refused: the batch forks from the stored chain after block {fork}, {depth} blocks below the checkpoint {checkpoint}, deeper than the finality depth {finality_depth} (finalized up to {finalized}); nothing was changed")]
    DeepReorg {
        fork: i64,
        depth: i64,
        checkpoint: i64,
        finality_depth: i64,
        finalized: i64,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {}", dalp_db::connect::describe_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Write(WriteError),
    /// The node no longer has this chain's blocks within the finality depth: ingest stays
    /// stopped until an operator re-points the indexer or rewinds.
    #[error("chain {chain} diverged from its node at block {block} ({reason}); ingest is stopped. {}", divergence_next_step(*.chain))]
    Diverged {
        chain: i64,
        block: i64,
        reason: String,
    },
    /// A read "at" a block the index has not reached: answering would pretend.
    #[error("block {block} is not indexed yet: chain {chain} is indexed up to block {}", checkpoint.map(|c| c.to_string()).unwrap_or_else(|| "none".into()))]
    NotIndexedYet {
        chain: i64,
        block: i64,
        checkpoint: Option<i64>,
    },
}

impl From<WriteError> for IndexError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Db(e) => IndexError::Db(e),
            e => IndexError::Write(e),
        }
    }
}

/// What an operator does about a diverged chain.
pub fn divergence_next_step(chain: i64) -> String {
    format!(
        "Point the indexer at a node on the indexed chain (same chain id and history), or roll the index back: `dalp index rewind --chain-id {chain} --to <last good block> --beyond-finality`, or `--to -1` to re-index from scratch"
    )
}

/// Why and since when a chain is diverged (see [`IndexError::Diverged`]).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Divergence {
    pub since: DateTime<Utc>,
    /// The checkpoint when the divergence was found.
    pub block: i64,
    pub reason: String,
    /// What to do about it.
    pub next: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Chain {
    pub chain_id: i64,
    pub name: String,
    pub finality_depth: i32,
}

/// Where a chain's index stands.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SyncStatus {
    pub chain_id: i64,
    pub name: String,
    pub finality_depth: i32,
    /// Last ingested block, and its hash.
    pub checkpoint: Option<i64>,
    pub checkpoint_hash: Option<String>,
    pub finalized: Option<i64>,
    /// Newest head the indexer has reported seeing.
    pub head: Option<i64>,
    /// `head - checkpoint`.
    pub lag: Option<i64>,
    pub updated_at: Option<DateTime<Utc>>,
    /// `following`, or `diverged` (ingest stopped; see `diverged`).
    pub state: &'static str,
    pub diverged: Option<Divergence>,
}

impl SyncStatus {
    pub fn is_diverged(&self) -> bool {
        self.diverged.is_some()
    }
}

/// What one ingest call did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct IngestOutcome {
    /// Blocks written.
    pub applied: usize,
    /// Blocks already stored with the same hash (idempotent re-send).
    pub skipped: usize,
    pub logs: usize,
    pub transfers: usize,
    pub reorg: Option<Reorg>,
    /// The checkpoint after the batch.
    pub checkpoint: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Reorg {
    /// Last block both branches share.
    pub fork: i64,
    /// Blocks rolled back.
    pub depth: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Balance {
    pub token: String,
    pub account: String,
    /// Decimal, exact.
    pub balance: String,
    /// Block of the last change.
    pub block_number: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TransferRow {
    pub block_number: i64,
    pub block_time: DateTime<Utc>,
    pub log_index: i32,
    pub tx_hash: String,
    pub token: String,
    pub from: String,
    pub to: String,
    pub value: String,
}

/// Which transfers to list.
#[derive(Debug, Clone, Copy)]
pub enum TransferFilter<'a> {
    Token(&'a Address),
    Account(&'a Address),
}

/// Paging and time bounds for transfer lists; newest first. Time bounds prune partitions.
#[derive(Debug, Clone, Default)]
pub struct TransferQuery {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only transfers strictly before this (block, log index).
    pub before: Option<(i64, i32)>,
    pub limit: i64,
}

/// How rows reach the tables. `RowByRow` exists only as the benchmark's baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Binary COPY (the ingest path).
    Copy,
    /// One INSERT per row, same values, same transaction.
    RowByRow,
}

pub struct IndexedStore {
    pool: Pool,
    writer: Writer,
    mode: WriteMode,
    /// Months (`yyyy * 12 + month0`) whose partitions are known to exist.
    months: Mutex<HashSet<i32>>,
}

fn month_key(t: DateTime<Utc>) -> i32 {
    t.year() * 12 + t.month0() as i32
}

/// The first instant of the month `key` ([`month_key`]) names.
fn month_start(key: i32) -> DateTime<Utc> {
    use chrono::TimeZone;
    Utc.with_ymd_and_hms(
        key.div_euclid(12),
        key.rem_euclid(12) as u32 + 1,
        1,
        0,
        0,
        0,
    )
    .single()
    .expect("a valid month")
}

fn parse_big(s: &str) -> BigInt {
    // Values come from numeric(…, 0) columns cast to text: always plain integers.
    BigInt::from_str(s).expect("numeric text is an integer")
}

/// A row per (token, account, block) whose balance changed, and per (token, block) supply.
#[derive(Default)]
struct Ledger {
    history: Vec<(Address, Address, i64, DateTime<Utc>, Numeric)>,
    balances: HashMap<(Address, Address), (BigInt, i64)>,
    supply: Vec<(Address, i64, Numeric)>,
}

/// One decoded log with its block.
struct LogRow<'b> {
    number: i64,
    time: DateTime<Utc>,
    log: &'b crate::types::Log,
    decoded: Option<Decoded>,
}

impl IndexedStore {
    pub fn new(pool: Pool) -> IndexedStore {
        IndexedStore {
            writer: Writer::new(pool.clone(), "indexed"),
            pool,
            mode: WriteMode::Copy,
            months: Mutex::new(HashSet::new()),
        }
    }

    /// The same store writing with `mode` (benchmarks compare the two).
    pub fn with_write_mode(mut self, mode: WriteMode) -> IndexedStore {
        self.mode = mode;
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Registers a chain, or confirms it is registered with the same settings.
    #[tracing::instrument(target = "dalp_store", name = "indexed.register_chain", skip_all)]
    pub async fn register_chain(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        name: &str,
        finality_depth: i32,
    ) -> Result<Chain, IndexError> {
        dalp_types::ChainId::parse(chain_id).map_err(|e| e.for_field("chain_id"))?;
        let name = dalp_types::parse_text("name", name, 100)?;
        let name = name.as_str();
        if !(0..=100_000).contains(&finality_depth) {
            return Err(Invalid::new("finality_depth", "must be between 0 and 100000").into());
        }
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.register_chain").await?;
        let inserted = tx
            .typed_execute(
                "INSERT INTO dalp_indexed.chains (chain_id, name, finality_depth) VALUES ($1, $2, $3)
                 ON CONFLICT (chain_id) DO NOTHING",
                &[&chain_id, &name, &finality_depth],
            )
            .await?;
        let chain = Chain {
            chain_id,
            name: name.to_string(),
            finality_depth,
        };
        if inserted == 0 {
            let existing = self.chain_in(&**tx, chain_id).await?;
            if existing != chain {
                return Err(IndexError::ChainConflict(chain_id));
            }
            return Ok(existing);
        }
        tx.record(
            &ctx.event("indexed.chain.register", "chain")
                .resource(chain_id)
                .details(json!({ "name": name, "finality_depth": finality_depth })),
        )
        .await?;
        tx.commit().await?;
        Ok(chain)
    }

    /// Refuses `block` when the index has not reached it (a read "at" it would answer with
    /// the state of an older block).
    async fn indexed_up_to<C: GenericClient>(
        &self,
        client: &C,
        chain_id: i64,
        block: i64,
    ) -> Result<(), IndexError> {
        let checkpoint: Option<i64> = client
            .query_typed(
                "SELECT block_number FROM dalp_indexed.checkpoints WHERE chain_id = $1",
                &[(&chain_id, Type::INT8)],
            )
            .await?
            .first()
            .map(|r| r.get(0));
        if checkpoint.is_none_or(|c| block > c) {
            return Err(IndexError::NotIndexedYet {
                chain: chain_id,
                block,
                checkpoint,
            });
        }
        Ok(())
    }

    async fn chain_in<C: GenericClient>(
        &self,
        client: &C,
        chain_id: i64,
    ) -> Result<Chain, IndexError> {
        let row = client
            .query_typed(
                "SELECT name, finality_depth FROM dalp_indexed.chains WHERE chain_id = $1",
                &[(&chain_id, Type::INT8)],
            )
            .await?
            .into_iter()
            .next()
            .ok_or(IndexError::UnknownChain(chain_id))?;
        Ok(Chain {
            chain_id,
            name: row.get(0),
            finality_depth: row.get(1),
        })
    }

    #[tracing::instrument(target = "dalp_store", name = "indexed.chains", skip_all)]
    pub async fn chains(&self) -> Result<Vec<Chain>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        Ok(client
            .query_typed(
                "SELECT chain_id, name, finality_depth FROM dalp_indexed.chains ORDER BY chain_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| Chain {
                chain_id: r.get(0),
                name: r.get(1),
                finality_depth: r.get(2),
            })
            .collect())
    }

    /// The stored hash of block `number`, if it is indexed.
    #[tracing::instrument(target = "dalp_store", name = "indexed.block_hash", skip_all)]
    pub async fn block_hash(&self, chain_id: i64, number: i64) -> Result<Option<Hash>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let row = client
            .query_typed(
                "SELECT hash FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                &[(&chain_id, Type::INT8), (&number, Type::INT8)],
            )
            .await?;
        Ok(row.first().map(|r| {
            let h: Vec<u8> = r.get(0);
            Hash::try_from(h.as_slice()).expect("CHECK length(hash) = 32")
        }))
    }

    #[tracing::instrument(target = "dalp_store", name = "indexed.status", skip_all)]
    pub async fn status(&self, chain_id: i64) -> Result<SyncStatus, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        // One round trip: the chain row (with its divergence) and its checkpoint, if any.
        let r = client
            .query_typed(
                "SELECT c.name, c.finality_depth, c.diverged_at, c.diverged_block, c.diverged_reason,
                        p.block_number, p.block_hash, p.finalized_number, p.head_number, p.updated_at
                   FROM dalp_indexed.chains c
                   LEFT JOIN dalp_indexed.checkpoints p ON p.chain_id = c.chain_id
                  WHERE c.chain_id = $1",
                &[(&chain_id, Type::INT8)],
            )
            .await?
            .into_iter()
            .next()
            .ok_or(IndexError::UnknownChain(chain_id))?;
        let diverged = r
            .get::<_, Option<DateTime<Utc>>>(2)
            .map(|since| Divergence {
                since,
                block: r.get::<_, Option<i64>>(3).unwrap_or(-1),
                reason: r.get(4),
                next: divergence_next_step(chain_id),
            });
        let checkpoint: Option<i64> = r.get(5);
        let head: Option<i64> = r.get(8);
        Ok(SyncStatus {
            chain_id,
            name: r.get(0),
            finality_depth: r.get(1),
            checkpoint,
            checkpoint_hash: r.get::<_, Option<&[u8]>>(6).map(hex0x),
            finalized: r.get(7),
            head,
            lag: head.zip(checkpoint).map(|(h, c)| (h - c).max(0)),
            updated_at: r.get(9),
            state: if diverged.is_some() {
                "diverged"
            } else {
                "following"
            },
            diverged,
        })
    }

    /// Makes sure the partitions of `months` ([`month_key`]s) exist (cached per month).
    async fn ensure_partitions(
        &self,
        tx: &Transaction<'_>,
        months: &[i32],
    ) -> Result<(), IndexError> {
        let missing: Vec<i32> = {
            let known = self.months.lock().expect("months lock");
            months
                .iter()
                .copied()
                .filter(|m| !known.contains(m))
                .collect()
        };
        for m in missing {
            let start = month_start(m);
            for table in PARTITIONED {
                tx.typed_execute(
                    "SELECT dalp_indexed.ensure_partitions($1, $2, $3)",
                    &[&table, &start, &start],
                )
                .await?;
            }
        }
        // Remembered by `remember_months` once the transaction commits: a rolled-back
        // transaction takes its partitions with it.
        Ok(())
    }

    fn remember_months(&self, months: &[i32]) {
        self.months
            .lock()
            .expect("months lock")
            .extend(months.iter().copied());
    }

    /// Forgets which partitions exist (after the partition manager dropped some).
    pub fn forget_partitions(&self) {
        self.months.lock().expect("months lock").clear();
    }

    /// Ingests a batch of consecutive blocks (see the module docs). `head` is the newest
    /// block the sender has seen on the chain, for lag reporting.
    #[tracing::instrument(target = "dalp_store", name = "indexed.ingest", skip_all)]
    pub async fn ingest(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        blocks: &[Block],
        head: Option<i64>,
    ) -> Result<IngestOutcome, IndexError> {
        let result = self.ingest_once(ctx, chain_id, blocks, head).await;
        if let Err(IndexError::Db(e)) = &result {
            // The partition manager dropped a month we remembered: forget, and let the
            // caller's retry create it again.
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
                && e.as_db_error()
                    .is_some_and(|d| d.message().contains("no partition"))
            {
                self.forget_partitions();
            }
        }
        result
    }

    /// Rolls the stored chain back to block `fork` (everything above it goes: rows,
    /// balances, supply, checkpoint), e.g. to re-index from there. Refused below the
    /// finalized block, like a reorg that deep, and on a diverged chain (the follower must
    /// not quietly carry on).
    pub async fn rewind(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        fork: i64,
    ) -> Result<Reorg, IndexError> {
        self.rewind_with(ctx, chain_id, fork, false).await
    }

    /// An operator's rewind (`dalp index rewind`): with `beyond_finality` it may go below the
    /// finalized block — down to `-1`, which empties the chain's index for a re-index — and
    /// it ends a divergence, since the operator has decided where the index resumes.
    #[tracing::instrument(target = "dalp_store", name = "indexed.rewind", skip_all)]
    pub async fn rewind_with(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        fork: i64,
        beyond_finality: bool,
    ) -> Result<Reorg, IndexError> {
        if fork < -1 {
            return Err(Invalid::new("to", "must be -1 (re-index) or a block number").into());
        }
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.rewind").await?;
        let (finality_depth, cp) = lock_chain_any(&tx, chain_id).await?;
        if !beyond_finality {
            refuse_if_diverged(&tx, chain_id).await?;
        }
        let (n, _, finalized) =
            cp.ok_or_else(|| IndexError::NotFound(format!("a checkpoint of chain {chain_id}")))?;
        let depth = if beyond_finality {
            (n - fork).max(0)
        } else {
            reorg_depth(fork, n, finalized, finality_depth)?
        };
        // Below the first indexed block, everything goes.
        let lowest: i64 = tx
            .typed_query_one(
                "SELECT coalesce(min(number), 0) FROM dalp_indexed.blocks WHERE chain_id = $1",
                &[&chain_id],
            )
            .await?
            .get(0);
        self.rollback(&tx, chain_id, fork.max(lowest - 1)).await?;
        let cleared = tx
            .typed_execute(
                "UPDATE dalp_indexed.chains SET diverged_at = NULL, diverged_block = NULL, diverged_reason = NULL
                  WHERE chain_id = $1 AND diverged_at IS NOT NULL",
                &[&chain_id],
            )
            .await?;
        tx.record(
            &ctx.event("indexed.blocks.rewind", "chain")
                .resource(chain_id)
                .details(json!({
                    "fork": fork,
                    "depth": depth,
                    "beyond_finality": beyond_finality,
                    "divergence_cleared": cleared > 0,
                })),
        )
        .await?;
        tx.commit().await?;
        Ok(Reorg { fork, depth })
    }

    /// Marks the chain diverged (see [`IndexError::Diverged`]); the first finding stays.
    #[tracing::instrument(target = "dalp_store", name = "indexed.mark_diverged", skip_all)]
    pub async fn mark_diverged(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        block: i64,
        reason: &str,
    ) -> Result<(), IndexError> {
        let reason: String = reason.chars().filter(|c| *c != '\0').take(1000).collect();
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.mark_diverged").await?;
        let n = tx
            .typed_execute(
                "UPDATE dalp_indexed.chains SET diverged_at = now(), diverged_block = $2, diverged_reason = $3
                  WHERE chain_id = $1 AND diverged_at IS NULL",
                &[&chain_id, &block, &reason],
            )
            .await?;
        if n == 0 {
            tx.commit_unaudited("already marked diverged: nothing changed")
                .await?;
            return Ok(());
        }
        tx.record(
            &ctx.event("indexed.chain.diverged", "chain")
                .resource(chain_id)
                .outcome(dalp_audit::Outcome::Error)
                .details(json!({ "block": block, "reason": reason })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ingest_once(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        blocks: &[Block],
        head: Option<i64>,
    ) -> Result<IngestOutcome, IndexError> {
        if blocks.is_empty() {
            return Err(Invalid::new("blocks", "a batch needs at least one block").into());
        }
        check_chain(blocks)?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.ingest").await?;
        let (finality_depth, cp) = lock_chain(&tx, chain_id).await?;
        let first = blocks[0].number;
        let last = blocks[blocks.len() - 1].number;
        let mut outcome = IngestOutcome::default();
        let mut start = 0usize; // index of the first block to write
        if let Some((n, ref cp_hash, finalized)) = cp {
            if first > n + 1 {
                return Err(IndexError::Gap {
                    chain: chain_id,
                    indexed: n,
                    got: first,
                });
            }
            let lowest: Option<i64> = tx
                .typed_query_one(
                    "SELECT min(number) FROM dalp_indexed.blocks WHERE chain_id = $1",
                    &[&chain_id],
                )
                .await?
                .get(0);
            if let Some(lowest) = lowest.filter(|l| first < *l) {
                return Err(Invalid::new(
                    "number",
                    format!("chain {chain_id} is indexed from block {lowest}; a batch cannot start below it (at {first})"),
                )
                .into());
            }
            // The stored parent of the batch must be the batch's parent.
            let parent = if first == n + 1 {
                Some((cp_hash.clone(), None))
            } else {
                tx.typed_query_opt(
                    "SELECT hash, block_time FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                    &[&chain_id, &(first - 1)],
                )
                .await?
                .map(|r| (r.get::<_, Vec<u8>>(0), Some(r.get::<_, DateTime<Utc>>(1))))
            };
            if let Some((hash, _)) = &parent {
                if hash.as_slice() != &blocks[0].parent_hash[..] {
                    return Err(IndexError::ParentMismatch { number: first });
                }
            }
            // Compare the overlap with what is stored; the first difference is the fork.
            let stored: HashMap<i64, Vec<u8>> = tx
                .typed_query(
                    "SELECT number, hash FROM dalp_indexed.blocks WHERE chain_id = $1 AND number BETWEEN $2 AND $3",
                    &[&chain_id, &first, &n.min(last)],
                )
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut fork = None;
            for (i, b) in blocks.iter().enumerate().take_while(|(_, b)| b.number <= n) {
                match stored.get(&b.number) {
                    Some(h) if h.as_slice() == &b.hash[..] => {
                        outcome.skipped += 1;
                        start = i + 1;
                    }
                    _ => {
                        fork = Some(b.number - 1);
                        start = i;
                        break;
                    }
                }
            }
            if let Some(fork) = fork {
                let depth = reorg_depth(fork, n, finalized, finality_depth)?;
                self.rollback(&tx, chain_id, fork).await?;
                outcome.reorg = Some(Reorg { fork, depth });
            }
            if let Some((_, Some(parent_time))) = parent {
                if blocks[0].time < parent_time {
                    return Err(Invalid::new(
                        "timestamp",
                        format!("blocks[0]: block {first} is older than its stored parent"),
                    )
                    .into());
                }
            }
        }
        let new = &blocks[start..];
        // The months the new blocks fall in, not every month between the first and the
        // last: a dev chain's genesis at time 0 (or years before block 1) needs one
        // partition for it, not one per month since.
        let mut months: Vec<i32> = new.iter().map(|b| month_key(b.time)).collect();
        months.sort_unstable();
        months.dedup();
        if !new.is_empty() {
            self.ensure_partitions(&tx, &months).await?;
            let written = self.write_blocks(&tx, chain_id, new).await?;
            outcome.logs = written.0;
            outcome.transfers = written.1;
            outcome.applied = new.len();
        }
        let tip = blocks.last().expect("non-empty");
        if !new.is_empty() {
            tx.typed_execute(
                "INSERT INTO dalp_indexed.checkpoints AS c
                     (chain_id, block_number, block_hash, finalized_number, head_number, updated_at)
                 VALUES ($1, $2, $3, greatest($2::int8 - $4::int8, 0), $5, now())
                 ON CONFLICT (chain_id) DO UPDATE SET
                     block_number = EXCLUDED.block_number,
                     block_hash = EXCLUDED.block_hash,
                     finalized_number = least(greatest(c.finalized_number, EXCLUDED.finalized_number), EXCLUDED.block_number),
                     head_number = greatest(coalesce(EXCLUDED.head_number, c.head_number), EXCLUDED.block_number),
                     updated_at = now()",
                &[&chain_id, &tip.number, &tip.hash, &i64::from(finality_depth), &head],
            )
            .await?;
            outcome.checkpoint = tip.number;
        } else {
            // Everything was already stored: nothing changes but the reported head.
            if let Some(h) = head {
                tx.typed_execute(
                    "UPDATE dalp_indexed.checkpoints SET head_number = $2
                      WHERE chain_id = $1 AND coalesce(head_number, -1) < $2",
                    &[&chain_id, &h],
                )
                .await?;
            }
            outcome.checkpoint = cp.as_ref().map(|c| c.0).unwrap_or(tip.number);
        }
        if outcome.applied > 0 || outcome.reorg.is_some() {
            tx.record(
                &ctx.event("indexed.blocks.ingest", "chain")
                    .resource(chain_id)
                    .details(json!({
                        "from": first, "to": last, "applied": outcome.applied,
                        "skipped": outcome.skipped, "logs": outcome.logs,
                        "transfers": outcome.transfers, "reorg": outcome.reorg,
                    })),
            )
            .await?;
            tx.commit().await?;
        } else {
            tx.commit_unaudited("only the node's head height moved; no block was applied")
                .await?;
        }
        self.remember_months(&months);
        if let Some(r) = &outcome.reorg {
            tracing::warn!(
                chain_id,
                fork = r.fork,
                depth = r.depth,
                "reorg rolled back"
            );
        }
        Ok(outcome)
    }

    /// Removes everything above block `fork` and restores balances, supply and checkpoint.
    async fn rollback(
        &self,
        tx: &Transaction<'_>,
        chain_id: i64,
        fork: i64,
    ) -> Result<(), IndexError> {
        // Block times never decrease along the chain, so every removed row is at or after
        // the first removed block's time: the bound prunes partitions.
        let Some(since) = tx
            .typed_query_opt(
                "SELECT block_time FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                &[&chain_id, &(fork + 1)],
            )
            .await?
            .map(|r| r.get::<_, DateTime<Utc>>(0))
        else {
            return Ok(());
        };
        for table in ["transactions", "logs", "transfers"] {
            tx.typed_execute(
                &format!(
                    "DELETE FROM dalp_indexed.{table} WHERE chain_id = $1 AND block_time >= $2 AND block_number > $3"
                ),
                &[&chain_id, &since, &fork],
            )
            .await?;
        }
        let gone = tx
            .typed_query(
                "WITH gone AS (
                     DELETE FROM dalp_indexed.balance_history
                      WHERE chain_id = $1 AND block_time >= $2 AND block_number > $3
                  RETURNING token, account)
                 SELECT array_agg(token), array_agg(account)
                   FROM (SELECT DISTINCT token, account FROM gone) d",
                &[&chain_id, &since, &fork],
            )
            .await?;
        let tokens: Option<Vec<Vec<u8>>> = gone[0].get(0);
        let accounts: Option<Vec<Vec<u8>>> = gone[0].get(1);
        // Each touched balance becomes its newest remaining history row, or goes.
        tx.typed_execute(
            "WITH latest AS (
                 SELECT p.token, p.account, h.balance, h.block_number
                   FROM unnest($2::bytea[], $3::bytea[]) AS p(token, account)
                   LEFT JOIN LATERAL (
                        SELECT balance, block_number FROM dalp_indexed.balance_history h
                         WHERE h.chain_id = $1 AND h.token = p.token AND h.account = p.account
                         ORDER BY block_number DESC LIMIT 1) h ON true),
             upd AS (
                 UPDATE dalp_indexed.balances b SET balance = l.balance, block_number = l.block_number
                   FROM latest l
                  WHERE l.balance IS NOT NULL AND b.chain_id = $1 AND b.token = l.token AND b.account = l.account)
             DELETE FROM dalp_indexed.balances b USING latest l
              WHERE l.balance IS NULL AND b.chain_id = $1 AND b.token = l.token AND b.account = l.account",
            &[&chain_id, &tokens.unwrap_or_default(), &accounts.unwrap_or_default()],
        )
        .await?;
        for table in ["supply_history", "role_events"] {
            tx.typed_execute(
                &format!(
                    "DELETE FROM dalp_indexed.{table} WHERE chain_id = $1 AND block_number > $2"
                ),
                &[&chain_id, &fork],
            )
            .await?;
        }
        tx.typed_execute(
            "DELETE FROM dalp_indexed.blocks WHERE chain_id = $1 AND number > $2",
            &[&chain_id, &fork],
        )
        .await?;
        // The checkpoint moves to the fork block (or goes, if nothing below it is indexed).
        let fork_hash = tx
            .typed_query_opt(
                "SELECT hash FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                &[&chain_id, &fork],
            )
            .await?;
        match fork_hash {
            Some(r) => {
                let h: Vec<u8> = r.get(0);
                tx.typed_execute(
                    "UPDATE dalp_indexed.checkpoints SET block_number = $2, block_hash = $3,
                            finalized_number = least(finalized_number, $2), updated_at = now()
                      WHERE chain_id = $1",
                    &[&chain_id, &fork, &h],
                )
                .await?;
            }
            None => {
                tx.typed_execute(
                    "DELETE FROM dalp_indexed.checkpoints WHERE chain_id = $1",
                    &[&chain_id],
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Writes `blocks` (already checked to extend the stored chain). Returns (logs, transfers).
    async fn write_blocks(
        &self,
        tx: &Transaction<'_>,
        chain_id: i64,
        blocks: &[Block],
    ) -> Result<(usize, usize), IndexError> {
        let mut logs = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            for (j, l) in b.logs.iter().enumerate() {
                let decoded = decode(l, &format!("blocks[{i}].logs[{j}]"))?;
                logs.push(LogRow {
                    number: b.number,
                    time: b.time,
                    log: l,
                    decoded,
                });
            }
        }
        let ledger = self.ledger(tx, chain_id, &logs).await?;

        let counts: Vec<(i32, i32)> = blocks
            .iter()
            .map(|b| (b.transactions.len() as i32, b.logs.len() as i32))
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.blocks (chain_id, number, hash, parent_hash, block_time, tx_count, log_count) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::BYTEA, Type::BYTEA, Type::TIMESTAMPTZ, Type::INT4, Type::INT4],
            blocks.iter().zip(&counts),
            |(b, (t, l))| {
                vec![&chain_id, &b.number, &b.hash, &b.parent_hash, &b.time, t, l]
            },
        )
        .await?;

        let txs: Vec<_> = blocks
            .iter()
            .flat_map(|b| b.transactions.iter().map(move |t| (b, t, t.to)))
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.transactions (chain_id, block_number, block_time, tx_index, hash, from_address, to_address, status) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::INT4, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::INT2],
            txs.iter(),
            |(b, t, to)| {
                vec![&chain_id, &b.number, &b.time, &t.index, &t.hash, &t.from, to, &t.status]
            },
        )
        .await?;

        let log_cols: Vec<_> = logs
            .iter()
            .map(|r| {
                let topic = |k: usize| r.log.topics.get(k).map(|t| &t[..]);
                (
                    [topic(0), topic(1), topic(2), topic(3)],
                    r.decoded.as_ref().map(|d| d.name()),
                    r.decoded.as_ref().map(|d| d.to_json()),
                )
            })
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.logs (chain_id, block_number, block_time, log_index, tx_hash, tx_index, address, topic0, topic1, topic2, topic3, data, event, decoded) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::INT4, Type::BYTEA, Type::INT4, Type::BYTEA,
              Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::TEXT, Type::JSONB],
            logs.iter().zip(&log_cols),
            |(r, (topics, event, decoded))| {
                vec![&chain_id, &r.number, &r.time, &r.log.log_index, &r.log.tx_hash, &r.log.tx_index,
                     &r.log.address, &topics[0], &topics[1], &topics[2], &topics[3], &r.log.data, event, decoded]
            },
        )
        .await?;

        let transfers: Vec<_> = logs
            .iter()
            .filter_map(|r| match &r.decoded {
                Some(Decoded::Transfer(t)) => Some((r, t, Numeric(BigInt::from(t.value.clone())))),
                _ => None,
            })
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.transfers (chain_id, block_number, block_time, log_index, tx_hash, token, from_address, to_address, value) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::INT4, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::NUMERIC],
            transfers.iter(),
            |(r, t, v)| {
                vec![&chain_id, &r.number, &r.time, &r.log.log_index, &r.log.tx_hash,
                     &t.token, &t.from, &t.to, v]
            },
        )
        .await?;

        let roles: Vec<_> = logs
            .iter()
            .filter_map(|r| match &r.decoded {
                Some(Decoded::Role(c)) => Some((r, c)),
                _ => None,
            })
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.role_events (chain_id, block_number, log_index, contract, role, account, sender, granted) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::INT4, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BOOL],
            roles.iter(),
            |(r, c)| {
                vec![&chain_id, &r.number, &r.log.log_index, &c.contract, &c.role,
                     &c.account, &c.sender, &c.granted]
            },
        )
        .await?;

        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.balance_history (chain_id, token, account, block_number, block_time, balance) FROM STDIN BINARY",
            &[Type::INT8, Type::BYTEA, Type::BYTEA, Type::INT8, Type::TIMESTAMPTZ, Type::NUMERIC],
            ledger.history.iter(),
            |(token, account, n, t, v)| vec![&chain_id, token, account, n, t, v],
        )
        .await?;
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.supply_history (chain_id, token, block_number, total_supply) FROM STDIN BINARY",
            &[Type::INT8, Type::BYTEA, Type::INT8, Type::NUMERIC],
            ledger.supply.iter(),
            |(token, n, v)| vec![&chain_id, token, n, v],
        )
        .await?;

        if !ledger.balances.is_empty() {
            let mut tokens = Vec::with_capacity(ledger.balances.len());
            let mut accounts = Vec::with_capacity(ledger.balances.len());
            let mut values = Vec::with_capacity(ledger.balances.len());
            let mut numbers = Vec::with_capacity(ledger.balances.len());
            for ((t, a), (v, n)) in &ledger.balances {
                tokens.push(&t[..]);
                accounts.push(&a[..]);
                values.push(v.to_string());
                numbers.push(*n);
            }
            tx.typed_execute(
                "INSERT INTO dalp_indexed.balances (chain_id, token, account, balance, block_number)
                 SELECT $1, t, a, v::numeric, n FROM unnest($2::bytea[], $3::bytea[], $4::text[], $5::int8[]) AS u(t, a, v, n)
                 ON CONFLICT (chain_id, token, account)
                 DO UPDATE SET balance = EXCLUDED.balance, block_number = EXCLUDED.block_number",
                &[&chain_id, &tokens, &accounts, &values, &numbers],
            )
            .await?;
        }
        Ok((logs.len(), transfers.len()))
    }

    /// Runs the batch's transfers over the stored balances and supply.
    async fn ledger(
        &self,
        tx: &Transaction<'_>,
        chain_id: i64,
        logs: &[LogRow<'_>],
    ) -> Result<Ledger, IndexError> {
        let transfers: Vec<(i64, DateTime<Utc>, &crate::decode::Transfer)> = logs
            .iter()
            .filter_map(|r| match &r.decoded {
                Some(Decoded::Transfer(t)) => Some((r.number, r.time, t)),
                _ => None,
            })
            .collect();
        let mut ledger = Ledger::default();
        if transfers.is_empty() {
            return Ok(ledger);
        }
        let mut pairs: HashSet<(Address, Address)> = HashSet::new();
        let mut supply_tokens: HashSet<Address> = HashSet::new();
        for (_, _, t) in &transfers {
            for account in [t.from, t.to] {
                if account == ZERO {
                    supply_tokens.insert(t.token);
                } else {
                    pairs.insert((t.token, account));
                }
            }
        }
        let (tokens, accounts): (Vec<&[u8]>, Vec<&[u8]>) =
            pairs.iter().map(|(t, a)| (&t[..], &a[..])).unzip();
        for row in tx
            .typed_query(
                "SELECT b.token, b.account, b.balance::text
                   FROM unnest($2::bytea[], $3::bytea[]) AS p(token, account)
                   JOIN dalp_indexed.balances b
                     ON b.chain_id = $1 AND b.token = p.token AND b.account = p.account",
                &[&chain_id, &tokens, &accounts],
            )
            .await?
        {
            let key = (to20(row.get(0)), to20(row.get(1)));
            ledger.balances.insert(key, (parse_big(row.get(2)), 0));
        }
        let supply_list: Vec<&[u8]> = supply_tokens.iter().map(|t| &t[..]).collect();
        let mut supply: HashMap<Address, BigInt> = HashMap::new();
        for row in tx
            .typed_query(
                "SELECT DISTINCT ON (token) token, total_supply::text FROM dalp_indexed.supply_history
                  WHERE chain_id = $1 AND token = ANY($2) ORDER BY token, block_number DESC",
                &[&chain_id, &supply_list],
            )
            .await?
        {
            supply.insert(to20(row.get(0)), parse_big(row.get(1)));
        }

        // Per block: apply its transfers, then record each touched pair's balance once.
        let mut touched: Vec<(Address, Address)> = Vec::new();
        let mut touched_supply: Vec<Address> = Vec::new();
        let mut i = 0;
        while i < transfers.len() {
            let (number, time, _) = transfers[i];
            touched.clear();
            touched_supply.clear();
            while i < transfers.len() && transfers[i].0 == number {
                let t = transfers[i].2;
                let value = BigInt::from_biguint(Sign::Plus, t.value.clone());
                for (account, signed) in [(t.from, -value.clone()), (t.to, value.clone())] {
                    if account == ZERO {
                        // A mint (from zero) adds to supply, a burn (to zero) removes.
                        let s = supply.entry(t.token).or_default();
                        *s -= &signed;
                        if !touched_supply.contains(&t.token) {
                            touched_supply.push(t.token);
                        }
                        continue;
                    }
                    let key = (t.token, account);
                    let entry = ledger.balances.entry(key).or_insert((BigInt::default(), 0));
                    entry.0 += &signed;
                    entry.1 = number;
                    if !touched.contains(&key) {
                        touched.push(key);
                    }
                }
                i += 1;
            }
            for key in &touched {
                let v = ledger.balances[key].0.clone();
                ledger
                    .history
                    .push((key.0, key.1, number, time, Numeric(v)));
            }
            for token in &touched_supply {
                ledger
                    .supply
                    .push((*token, number, Numeric(supply[token].clone())));
            }
        }
        Ok(ledger)
    }

    /// Current balances of `account` across tokens.
    #[tracing::instrument(target = "dalp_store", name = "indexed.balances_of", skip_all)]
    pub async fn balances_of(
        &self,
        chain_id: i64,
        account: &Address,
    ) -> Result<Vec<Balance>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        let rows = client
            .query_typed(
                "SELECT token, account, balance::text, block_number FROM dalp_indexed.balances
                  WHERE chain_id = $1 AND account = $2 AND balance <> 0 ORDER BY token",
                &[(&chain_id, Type::INT8), (&account, Type::BYTEA)],
            )
            .await?;
        Ok(rows.iter().map(balance_row).collect())
    }

    /// Holders of `token`, largest first; `after` is the last (balance, account) of the
    /// previous page.
    #[tracing::instrument(target = "dalp_store", name = "indexed.holders", skip_all)]
    pub async fn holders(
        &self,
        chain_id: i64,
        token: &Address,
        limit: i64,
        after: Option<(&str, &Address)>,
    ) -> Result<Vec<Balance>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        let (after_balance, after_account) = match after {
            Some((b, a)) => (Some(b.to_string()), Some(a.to_vec())),
            None => (None, None),
        };
        let rows = client
            .query_typed(
                // Qualified: a bare `balance` in ORDER BY would sort the text output column.
                "SELECT b.token, b.account, b.balance::text, b.block_number FROM dalp_indexed.balances b
                  WHERE b.chain_id = $1 AND b.token = $2 AND b.balance > 0
                    AND ($3::text IS NULL OR (b.balance, b.account) < ($3::numeric, $4::bytea))
                  ORDER BY b.balance DESC, b.account DESC LIMIT $5",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&after_balance, Type::TEXT),
                    (&after_account, Type::BYTEA),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(balance_row).collect())
    }

    /// Transfers of a token or an account, newest first.
    #[tracing::instrument(target = "dalp_store", name = "indexed.transfers", skip_all)]
    pub async fn transfers(
        &self,
        chain_id: i64,
        filter: TransferFilter<'_>,
        q: &TransferQuery,
    ) -> Result<Vec<TransferRow>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        let (sql, addr) = transfers_sql(filter);
        let (before_block, before_log) = match q.before {
            Some((b, l)) => (Some(b), Some(l)),
            None => (None, None),
        };
        let rows = client
            .query_typed(
                &sql,
                &[
                    (&chain_id, Type::INT8),
                    (&addr, Type::BYTEA),
                    (&q.since, Type::TIMESTAMPTZ),
                    (&q.until, Type::TIMESTAMPTZ),
                    (&before_block, Type::INT8),
                    (&before_log, Type::INT4),
                    (&q.limit, Type::INT8),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TransferRow {
                block_number: r.get(0),
                block_time: r.get(1),
                log_index: r.get(2),
                tx_hash: hex0x(r.get::<_, &[u8]>(3)),
                token: hex0x(r.get::<_, &[u8]>(4)),
                from: hex0x(r.get::<_, &[u8]>(5)),
                to: hex0x(r.get::<_, &[u8]>(6)),
                value: r.get(7),
            })
            .collect())
    }

    /// The balance of `account` in `token` after block `block` ("0" before any transfer).
    #[tracing::instrument(target = "dalp_store", name = "indexed.balance_at", skip_all)]
    pub async fn balance_at(
        &self,
        chain_id: i64,
        token: &Address,
        account: &Address,
        block: i64,
    ) -> Result<String, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        self.indexed_up_to(&**client, chain_id, block).await?;
        let row = client
            .query_typed(
                "SELECT balance::text FROM dalp_indexed.balance_history
                  WHERE chain_id = $1 AND token = $2 AND account = $3 AND block_number <= $4
                  ORDER BY block_number DESC LIMIT 1",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&account, Type::BYTEA),
                    (&block, Type::INT8),
                ],
            )
            .await?;
        Ok(row.first().map(|r| r.get(0)).unwrap_or_else(|| "0".into()))
    }

    /// Total supply of `token` after block `block` (mints minus burns since indexing began).
    #[tracing::instrument(target = "dalp_store", name = "indexed.supply_at", skip_all)]
    pub async fn supply_at(
        &self,
        chain_id: i64,
        token: &Address,
        block: i64,
    ) -> Result<String, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        self.indexed_up_to(&**client, chain_id, block).await?;
        let row = client
            .query_typed(
                "SELECT total_supply::text FROM dalp_indexed.supply_history
                  WHERE chain_id = $1 AND token = $2 AND block_number <= $3
                  ORDER BY block_number DESC LIMIT 1",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&block, Type::INT8),
                ],
            )
            .await?;
        Ok(row.first().map(|r| r.get(0)).unwrap_or_else(|| "0".into()))
    }

    /// Tokens with indexed balances or supply at or below `block`, least recently
    /// reconciled first (never reconciled before all others).
    #[tracing::instrument(target = "dalp_store", name = "indexed.reconcile_candidates", skip_all)]
    pub async fn reconcile_candidates(
        &self,
        chain_id: i64,
        block: i64,
        limit: i64,
    ) -> Result<Vec<Address>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let rows = client
            .query_typed(
                "SELECT t.token FROM (SELECT DISTINCT token FROM dalp_indexed.supply_history
                                        WHERE chain_id = $1 AND block_number <= $2) t
                   LEFT JOIN dalp_indexed.reconciliations r ON r.chain_id = $1 AND r.token = t.token
                  ORDER BY r.checked_at NULLS FIRST, t.token LIMIT $3",
                &[
                    (&chain_id, Type::INT8),
                    (&block, Type::INT8),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| to20(r.get::<_, &[u8]>(0))).collect())
    }

    /// Up to `n` random holders of `token` (ever), each with its indexed balance after
    /// `block`.
    #[tracing::instrument(target = "dalp_store", name = "indexed.sample_balances", skip_all)]
    pub async fn sample_balances(
        &self,
        chain_id: i64,
        token: &Address,
        block: i64,
        n: i64,
    ) -> Result<Vec<(Address, String)>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let rows = client
            .query_typed(
                "SELECT s.account, coalesce(h.balance, 0)::text
                   FROM (SELECT account FROM dalp_indexed.balances
                          WHERE chain_id = $1 AND token = $2 ORDER BY random() LIMIT $4) s
                   LEFT JOIN LATERAL (
                        SELECT balance FROM dalp_indexed.balance_history h
                         WHERE h.chain_id = $1 AND h.token = $2 AND h.account = s.account
                           AND h.block_number <= $3
                         ORDER BY h.block_number DESC LIMIT 1) h ON true",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&block, Type::INT8),
                    (&n, Type::INT8),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (to20(r.get::<_, &[u8]>(0)), r.get(1)))
            .collect())
    }

    /// Keeps `r` as the token's newest reconciliation; a newly found disagreement is
    /// audited.
    #[tracing::instrument(
        target = "dalp_store",
        name = "indexed.record_reconciliation",
        skip_all
    )]
    pub async fn record_reconciliation(
        &self,
        chain_id: i64,
        token: &Address,
        r: &crate::reconcile::TokenReconciliation,
        drifted: &[Address],
    ) -> Result<(), IndexError> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.record_reconciliation").await?;
        let drifted: Vec<Vec<u8>> = drifted.iter().map(|a| a.to_vec()).collect();
        let balances_checked = r.balances_checked as i32;
        let was_in_agreement: Option<bool> = tx
            .typed_query_one(
                "WITH old AS (SELECT in_agreement FROM dalp_indexed.reconciliations
                               WHERE chain_id = $1 AND token = $2 FOR UPDATE),
                      up AS (INSERT INTO dalp_indexed.reconciliations AS c
                               (chain_id, token, block_number, checked_at, indexed_supply, node_supply,
                                balances_checked, drifted_accounts, in_agreement)
                             VALUES ($1, $2, $3, now(), $4::text::numeric, $5::text::numeric, $6, $7, $8)
                             ON CONFLICT (chain_id, token) DO UPDATE SET
                                block_number = EXCLUDED.block_number, checked_at = EXCLUDED.checked_at,
                                indexed_supply = EXCLUDED.indexed_supply, node_supply = EXCLUDED.node_supply,
                                balances_checked = EXCLUDED.balances_checked,
                                drifted_accounts = EXCLUDED.drifted_accounts,
                                in_agreement = EXCLUDED.in_agreement)
                 SELECT (SELECT in_agreement FROM old)",
                &[
                    &chain_id,
                    &token,
                    &r.block,
                    &r.indexed_supply,
                    &r.node_supply,
                    &balances_checked,
                    &drifted,
                    &r.in_agreement,
                ],
            )
            .await?
            .get(0);
        if !r.in_agreement && was_in_agreement != Some(false) {
            tx.record(
                &RequestContext::service("indexer")
                    .event("indexed.reconcile.drift", "token")
                    .resource(&r.token)
                    .outcome(dalp_audit::Outcome::Error)
                    .details(json!({
                        "chain_id": chain_id,
                        "block": r.block,
                        "indexed_supply": r.indexed_supply,
                        "node_supply": r.node_supply,
                        "drifted_accounts": r.drifted_accounts,
                    })),
            )
            .await?;
            tx.commit().await?;
        } else {
            tx.commit_unaudited(
                "a reconciliation in agreement, or drift already reported: its row is the record",
            )
            .await?;
        }
        Ok(())
    }

    /// The newest reconciliation of every token of `chain_id`, disagreements first.
    #[tracing::instrument(target = "dalp_store", name = "indexed.reconciliations", skip_all)]
    pub async fn reconciliations(
        &self,
        chain_id: i64,
    ) -> Result<Vec<crate::reconcile::TokenReconciliation>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let rows = client
            .query_typed(
                "SELECT token, block_number, indexed_supply::text, node_supply::text, balances_checked,
                        drifted_accounts, in_agreement, checked_at
                   FROM dalp_indexed.reconciliations WHERE chain_id = $1
                  ORDER BY in_agreement, token",
                &[(&chain_id, Type::INT8)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| crate::reconcile::TokenReconciliation {
                token: hex0x(r.get::<_, &[u8]>(0)),
                block: r.get(1),
                indexed_supply: r.get(2),
                node_supply: r.get(3),
                balances_checked: r.get::<_, i32>(4) as usize,
                drifted_accounts: r
                    .get::<_, Vec<Vec<u8>>>(5)
                    .iter()
                    .map(|a| hex0x(a))
                    .collect(),
                in_agreement: r.get(6),
                checked_at: Some(r.get(7)),
            })
            .collect())
    }

    /// Row counts of every table for `chain_id` (tests and `dalp index status`).
    #[tracing::instrument(target = "dalp_store", name = "indexed.counts", skip_all)]
    pub async fn counts(&self, chain_id: i64) -> Result<Vec<(String, i64)>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let mut out = Vec::new();
        for table in [
            "blocks",
            "transactions",
            "logs",
            "transfers",
            "balance_history",
            "balances",
            "supply_history",
            "role_events",
        ] {
            let n: i64 = client
                .query_typed(
                    &format!("SELECT count(*) FROM dalp_indexed.{table} WHERE chain_id = $1"),
                    &[(&chain_id, Type::INT8)],
                )
                .await?[0]
                .get(0);
            out.push((table.to_string(), n));
        }
        Ok(out)
    }
}

/// Locks the chain row (one ingest or rewind per chain at a time) and reads its finality
/// depth and checkpoint `(block, hash, finalized)`; a diverged chain is refused.
async fn lock_chain(
    tx: &Transaction<'_>,
    chain_id: i64,
) -> Result<(i32, Option<(i64, Vec<u8>, i64)>), IndexError> {
    let locked = lock_chain_any(tx, chain_id).await?;
    refuse_if_diverged(tx, chain_id).await?;
    Ok(locked)
}

async fn refuse_if_diverged(tx: &Transaction<'_>, chain_id: i64) -> Result<(), IndexError> {
    if let Some(r) = tx
        .typed_query_opt(
            "SELECT diverged_block, diverged_reason FROM dalp_indexed.chains
              WHERE chain_id = $1 AND diverged_at IS NOT NULL",
            &[&chain_id],
        )
        .await?
    {
        return Err(IndexError::Diverged {
            chain: chain_id,
            block: r.get::<_, Option<i64>>(0).unwrap_or(-1),
            reason: r.get(1),
        });
    }
    Ok(())
}

/// [`lock_chain`] without the divergence check.
async fn lock_chain_any(
    tx: &Transaction<'_>,
    chain_id: i64,
) -> Result<(i32, Option<(i64, Vec<u8>, i64)>), IndexError> {
    let finality_depth: i32 = tx
        .typed_query_opt(
            "SELECT finality_depth FROM dalp_indexed.chains WHERE chain_id = $1 FOR NO KEY UPDATE",
            &[&chain_id],
        )
        .await?
        .ok_or(IndexError::UnknownChain(chain_id))?
        .get(0);
    let cp = tx
        .typed_query_opt(
            "SELECT block_number, block_hash, finalized_number FROM dalp_indexed.checkpoints WHERE chain_id = $1",
            &[&chain_id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2)));
    Ok((finality_depth, cp))
}

/// The depth of rolling back from checkpoint `n` to `fork`, if the finality rules allow it.
fn reorg_depth(fork: i64, n: i64, finalized: i64, finality_depth: i32) -> Result<i64, IndexError> {
    let depth = (n - fork).max(0);
    if fork < finalized || depth > i64::from(finality_depth) {
        return Err(IndexError::DeepReorg {
            fork,
            depth,
            checkpoint: n,
            finality_depth: i64::from(finality_depth),
            finalized,
        });
    }
    Ok(depth)
}

/// The transfer list statement for `filter` (shared by the store and EXPLAIN in tests).
pub fn transfers_sql(filter: TransferFilter<'_>) -> (String, Vec<u8>) {
    let (cond, addr) = match filter {
        TransferFilter::Token(t) => ("token = $2", t.to_vec()),
        TransferFilter::Account(a) => ("(from_address = $2 OR to_address = $2)", a.to_vec()),
    };
    (
        format!(
            "SELECT block_number, block_time, log_index, tx_hash, token, from_address, to_address, value::text
               FROM dalp_indexed.transfers
              WHERE chain_id = $1 AND {cond}
                AND ($3::timestamptz IS NULL OR block_time >= $3)
                AND ($4::timestamptz IS NULL OR block_time < $4)
                AND ($5::int8 IS NULL OR (block_number, log_index) < ($5, $6::int4))
              ORDER BY block_number DESC, log_index DESC LIMIT $7"
        ),
        addr,
    )
}

fn to20(b: &[u8]) -> Address {
    Address::try_from(b).expect("CHECK length = 20")
}

fn balance_row(r: &tokio_postgres::Row) -> Balance {
    Balance {
        token: hex0x(r.get::<_, &[u8]>(0)),
        account: hex0x(r.get::<_, &[u8]>(1)),
        balance: r.get(2),
        block_number: r.get(3),
    }
}

/// Binary COPY of `items` (mapped to one row of values each) through `stmt`.
async fn copy<T, I, F>(
    tx: &Transaction<'_>,
    mode: WriteMode,
    stmt: &str,
    types: &[Type],
    items: I,
    row: F,
) -> Result<u64, tokio_postgres::Error>
where
    I: IntoIterator<Item = T>,
    F: for<'x> Fn(&'x T) -> Vec<&'x (dyn ToSql + Sync)>,
{
    let mut items = items.into_iter().peekable();
    if items.peek().is_none() {
        return Ok(0);
    }
    if mode == WriteMode::RowByRow {
        // "COPY t (a, b) FROM STDIN BINARY" -> "INSERT INTO t (a, b) VALUES ($1, $2)"
        let target = stmt
            .trim_start_matches("COPY ")
            .trim_end_matches(" FROM STDIN BINARY");
        let params: Vec<String> = (1..=types.len()).map(|i| format!("${i}")).collect();
        let insert = tx
            .prepare_typed(
                &format!("INSERT INTO {target} VALUES ({})", params.join(", ")),
                types,
            )
            .await?;
        let mut n = 0;
        for item in items {
            n += tx.execute(&insert, &row(&item)).await?;
        }
        return Ok(n);
    }
    let sink = tx.copy_in(stmt).await?;
    let writer = BinaryCopyInWriter::new(sink, types);
    pin_mut!(writer);
    for item in items {
        writer.as_mut().write(&row(&item)).await?;
    }
    writer.finish().await
}
