//! Synthetic chains for tests and benchmarks: blocks linked by parent hash, each with ERC-20
//! transfers between a fixed set of accounts. `branch` salts the hashes, so two branches of
//! the same heights differ.

use chrono::{DateTime, Duration, Utc};

use crate::decode::TRANSFER;
use crate::types::{Address, Block, Hash, Log, Tx};

#[derive(Debug, Clone)]
pub struct Synth {
    pub token: Address,
    pub accounts: Vec<Address>,
    pub transfers_per_block: usize,
    /// Time of block 0; each block is 12 s after its parent.
    pub genesis_time: DateTime<Utc>,
    pub branch: u8,
}

/// A distinct, deterministic address.
pub fn address(tag: u8, i: u32) -> Address {
    let mut a = [0u8; 20];
    a[0] = tag;
    a[16..].copy_from_slice(&i.to_be_bytes());
    Address(a)
}

/// The hash of block `number` on `branch`.
pub fn block_hash(number: i64, branch: u8) -> Hash {
    let mut h = [0u8; 32];
    h[0] = 0xb1;
    h[1] = branch;
    h[24..].copy_from_slice(&number.to_be_bytes());
    Hash(h)
}

fn word(bytes: &[u8]) -> Hash {
    let mut w = [0u8; 32];
    w[32 - bytes.len()..].copy_from_slice(bytes);
    Hash(w)
}

impl Synth {
    pub fn new(accounts: u32, transfers_per_block: usize, genesis_time: DateTime<Utc>) -> Synth {
        Synth {
            token: address(0x70, 1),
            accounts: (0..accounts).map(|i| address(0xac, i)).collect(),
            transfers_per_block,
            genesis_time,
            branch: 0,
        }
    }

    pub fn on_branch(mut self, branch: u8) -> Synth {
        self.branch = branch;
        self
    }

    pub fn time(&self, number: i64) -> DateTime<Utc> {
        self.genesis_time + Duration::seconds(12 * number)
    }

    /// Block `number`; its parent is block `number - 1` of `parent_branch`. Block 0 mints
    /// 1,000,000 to every account; later blocks move small amounts around (never overdrawing).
    pub fn block(&self, number: i64, parent_branch: u8) -> Block {
        let hash = block_hash(number, self.branch);
        let parent_hash = if number == 0 {
            Hash::default()
        } else {
            block_hash(number - 1, parent_branch)
        };
        let mut transactions = Vec::new();
        let mut logs = Vec::new();
        let n = self.accounts.len();
        let count = if number == 0 {
            n
        } else {
            self.transfers_per_block
        };
        for i in 0..count {
            let mut tx_hash = hash.0;
            tx_hash[2..6].copy_from_slice(&(i as u32).to_be_bytes());
            let (from, to, value) = if number == 0 {
                (Address::default(), self.accounts[i], 1_000_000u64)
            } else {
                let k = (number as usize * 7919 + i * 104_729) % n;
                let from = self.accounts[k];
                let to = self.accounts[(k + 1 + i % (n - 1).max(1)) % n];
                (
                    from,
                    to,
                    1 + (number as u64 + i as u64 + u64::from(self.branch)) % 5,
                )
            };
            transactions.push(Tx {
                hash: Hash(tx_hash),
                index: i as i32,
                from,
                to: Some(self.token),
                status: Some(1),
            });
            logs.push(Log {
                tx_hash: Hash(tx_hash),
                tx_index: i as i32,
                log_index: i as i32,
                address: self.token,
                topics: vec![TRANSFER, word(&from), word(&to)],
                data: word(&value.to_be_bytes()).0.to_vec(),
            });
        }
        Block {
            number,
            hash,
            parent_hash,
            time: self.time(number),
            transactions,
            logs,
        }
    }

    /// Blocks `from..=to` on this branch, the first one's parent on `parent_branch`.
    pub fn blocks(&self, from: i64, to: i64, parent_branch: u8) -> Vec<Block> {
        (from..=to)
            .map(|n| {
                self.block(
                    n,
                    if n == from {
                        parent_branch
                    } else {
                        self.branch
                    },
                )
            })
            .collect()
    }
}
