//! [`IndexedStore`]: the only code that touches schema `dalp_indexed`. Ingest is one
//! transaction per batch (binary COPY of every row, balances, supply and the checkpoint, plus
//! its audit record); a batch that diverges from the stored chain within the finality depth
//! rolls the stored chain back to the fork point first, in the same transaction. One module per
//! concern: `chains` (registration, status, divergence), `ingest`, `reorg`, `reads` and
//! `reconciliations`; every change goes through the store's [`Writer`].

mod chains;
mod ingest;
mod reads;
mod reconciliations;
mod reorg;

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
