//! What the ingest path accepts. The wire form ([`BlockInput`], JSON with `0x` hex strings, as
//! `POST /api/v1/indexed/{chain}/blocks` and the follower produce it) is parsed once into
//! [`Block`]; nothing unparsed reaches SQL.

use bytes::BytesMut;
use chrono::{DateTime, TimeZone, Utc};
use dalp_types::{EvmAddress, Invalid};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// The most blocks one ingest batch may carry.
pub const MAX_BATCH_BLOCKS: usize = 10_000;
/// The most bytes of data one log may carry.
pub const MAX_LOG_DATA: usize = 64 * 1024;

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockInput {
    pub number: u64,
    pub hash: String,
    pub parent_hash: String,
    /// Unix seconds.
    pub timestamp: i64,
    #[serde(default)]
    pub transactions: Vec<TxInput>,
    #[serde(default)]
    pub logs: Vec<LogInput>,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TxInput {
    pub hash: String,
    pub index: u32,
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
    /// 1 success, 0 reverted; absent when unknown.
    #[serde(default)]
    pub status: Option<u8>,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogInput {
    pub tx_hash: String,
    pub tx_index: u32,
    pub log_index: u32,
    pub address: String,
    pub topics: Vec<String>,
    pub data: String,
}

macro_rules! fixed_bytes {
    ($(#[$doc:meta])* $name:ident, $n:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; $n]);

        impl std::ops::Deref for $name {
            type Target = [u8];
            fn deref(&self) -> &[u8] {
                &self.0
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = std::array::TryFromSliceError;
            fn try_from(b: &[u8]) -> Result<$name, Self::Error> {
                Ok($name(b.try_into()?))
            }
        }

        /// Bound as `bytea`.
        impl ToSql for $name {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut BytesMut,
            ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
                <&[u8] as ToSql>::to_sql(&&self.0[..], ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                *ty == Type::BYTEA
            }

            to_sql_checked!();
        }
    };
}

fixed_bytes!(
    /// A 32-byte block, transaction or topic hash.
    Hash,
    32
);
fixed_bytes!(
    /// A 20-byte account or contract address.
    Address,
    20
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub number: i64,
    pub hash: Hash,
    pub parent_hash: Hash,
    pub time: DateTime<Utc>,
    pub transactions: Vec<Tx>,
    pub logs: Vec<Log>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tx {
    pub hash: Hash,
    pub index: i32,
    pub from: Address,
    pub to: Option<Address>,
    pub status: Option<i16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub tx_hash: Hash,
    pub tx_index: i32,
    pub log_index: i32,
    pub address: Address,
    pub topics: Vec<Hash>,
    pub data: Vec<u8>,
}

/// `0x`-prefixed hex of any even length; `at` names the element in the message.
pub fn parse_hex(field: &'static str, at: &str, s: &str) -> Result<Vec<u8>, Invalid> {
    dalp_types::parse_hex(field, s).map_err(|e| Invalid::new(field, format!("{at}: {}", e.message)))
}

fn parse_fixed<const N: usize>(field: &'static str, at: &str, s: &str) -> Result<[u8; N], Invalid> {
    let bytes = parse_hex(field, at, s)?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        Invalid::new(
            field,
            format!(
                "{at}: must be {N} bytes (0x + {} hex digits), got {}",
                N * 2,
                b.len()
            ),
        )
    })
}

pub fn parse_hash(field: &'static str, at: &str, s: &str) -> Result<Hash, Invalid> {
    parse_fixed::<32>(field, at, s).map(Hash)
}

pub fn parse_address(field: &'static str, at: &str, s: &str) -> Result<Address, Invalid> {
    EvmAddress::parse(s)
        .map(|a| Address(*a.bytes()))
        .map_err(|e| Invalid::new(field, format!("{at}: {}", e.message)))
}

fn small_index(field: &'static str, at: &str, v: u32) -> Result<i32, Invalid> {
    i32::try_from(v).map_err(|_| Invalid::new(field, format!("{at}: {v} is too large")))
}

impl Block {
    /// Parses block `i` of a batch; `at` in messages names the offending element.
    pub fn parse(i: usize, b: &BlockInput) -> Result<Block, Invalid> {
        let at = format!("blocks[{i}]");
        let number = i64::try_from(b.number)
            .map_err(|_| Invalid::new("number", format!("{at}: block number is too large")))?;
        let time = Utc
            .timestamp_opt(b.timestamp, 0)
            .single()
            .filter(|_| b.timestamp >= 0)
            .ok_or_else(|| {
                Invalid::new(
                    "timestamp",
                    format!("{at}: {} is not a valid unix time", b.timestamp),
                )
            })?;
        let mut transactions = Vec::with_capacity(b.transactions.len());
        for (j, t) in b.transactions.iter().enumerate() {
            let at = format!("{at}.transactions[{j}]");
            transactions.push(Tx {
                hash: parse_hash("hash", &at, &t.hash)?,
                index: small_index("index", &at, t.index)?,
                from: parse_address("from", &at, &t.from)?,
                to: t
                    .to
                    .as_deref()
                    .map(|s| parse_address("to", &at, s))
                    .transpose()?,
                status: match t.status {
                    None => None,
                    Some(s @ (0 | 1)) => Some(i16::from(s)),
                    Some(s) => {
                        return Err(Invalid::new(
                            "status",
                            format!("{at}: {s} is not a status (1 success, 0 reverted)"),
                        ))
                    }
                },
            });
        }
        let mut logs = Vec::with_capacity(b.logs.len());
        for (j, l) in b.logs.iter().enumerate() {
            let at = format!("{at}.logs[{j}]");
            if l.topics.len() > 4 {
                return Err(Invalid::new(
                    "topics",
                    format!("{at}: a log has at most 4 topics, got {}", l.topics.len()),
                ));
            }
            let data = parse_hex("data", &at, &l.data)?;
            if data.len() > MAX_LOG_DATA {
                return Err(Invalid::new(
                    "data",
                    format!(
                        "{at}: {} bytes is more than the {MAX_LOG_DATA} accepted",
                        data.len()
                    ),
                ));
            }
            logs.push(Log {
                tx_hash: parse_hash("tx_hash", &at, &l.tx_hash)?,
                tx_index: small_index("tx_index", &at, l.tx_index)?,
                log_index: small_index("log_index", &at, l.log_index)?,
                address: parse_address("address", &at, &l.address)?,
                topics: l
                    .topics
                    .iter()
                    .map(|t| parse_hash("topics", &at, t))
                    .collect::<Result<_, _>>()?,
                data,
            });
        }
        let block = Block {
            number,
            hash: parse_hash("hash", &at, &b.hash)?,
            parent_hash: parse_hash("parent_hash", &at, &b.parent_hash)?,
            time,
            transactions,
            logs,
        };
        block.check_indexes(&at)?;
        Ok(block)
    }

    /// Transaction and log indexes are unique within the block.
    fn check_indexes(&self, at: &str) -> Result<(), Invalid> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.transactions {
            if !seen.insert(t.index) {
                return Err(Invalid::new(
                    "index",
                    format!("{at}: transaction index {} appears twice", t.index),
                ));
            }
        }
        seen.clear();
        for l in &self.logs {
            if !seen.insert(l.log_index) {
                return Err(Invalid::new(
                    "log_index",
                    format!("{at}: log index {} appears twice", l.log_index),
                ));
            }
        }
        Ok(())
    }
}

/// Parses a batch and checks it is a chain: consecutive numbers, each parent hash the
/// previous block's hash, block times never going backwards.
pub fn parse_batch(inputs: &[BlockInput]) -> Result<Vec<Block>, Invalid> {
    if inputs.is_empty() {
        return Err(Invalid::new("blocks", "a batch needs at least one block"));
    }
    if inputs.len() > MAX_BATCH_BLOCKS {
        return Err(Invalid::new(
            "blocks",
            format!(
                "{} blocks is more than the {MAX_BATCH_BLOCKS} one batch may carry; split it",
                inputs.len()
            ),
        ));
    }
    let blocks: Vec<Block> = inputs
        .iter()
        .enumerate()
        .map(|(i, b)| Block::parse(i, b))
        .collect::<Result<_, _>>()?;
    check_chain(&blocks)?;
    Ok(blocks)
}

/// The links between consecutive blocks of a batch.
pub fn check_chain(blocks: &[Block]) -> Result<(), Invalid> {
    for (i, pair) in blocks.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        if b.number != a.number + 1 {
            return Err(Invalid::new(
                "number",
                format!(
                    "blocks[{}]: block {} follows block {}; a batch must be consecutive (gap or disorder)",
                    i + 1,
                    b.number,
                    a.number
                ),
            ));
        }
        if b.parent_hash != a.hash {
            return Err(Invalid::new(
                "parent_hash",
                format!(
                    "blocks[{}]: parent hash of block {} is not the hash of block {} in this batch",
                    i + 1,
                    b.number,
                    a.number
                ),
            ));
        }
        if b.time < a.time {
            return Err(Invalid::new(
                "timestamp",
                format!(
                    "blocks[{}]: block {} is older than its parent",
                    i + 1,
                    b.number
                ),
            ));
        }
    }
    Ok(())
}

impl Block {
    /// The wire form of this block (what `POST .../blocks` and the follower send).
    pub fn to_input(&self) -> BlockInput {
        BlockInput {
            number: self.number as u64,
            hash: hex0x(&self.hash),
            parent_hash: hex0x(&self.parent_hash),
            timestamp: self.time.timestamp(),
            transactions: self
                .transactions
                .iter()
                .map(|t| TxInput {
                    hash: hex0x(&t.hash),
                    index: t.index as u32,
                    from: hex0x(&t.from),
                    to: t.to.map(|a| hex0x(&a)),
                    status: t.status.map(|s| s as u8),
                })
                .collect(),
            logs: self
                .logs
                .iter()
                .map(|l| LogInput {
                    tx_hash: hex0x(&l.tx_hash),
                    tx_index: l.tx_index as u32,
                    log_index: l.log_index as u32,
                    address: hex0x(&l.address),
                    topics: l.topics.iter().map(|t| hex0x(t)).collect(),
                    data: hex0x(&l.data),
                })
                .collect(),
        }
    }
}

pub use dalp_types::hex0x;
