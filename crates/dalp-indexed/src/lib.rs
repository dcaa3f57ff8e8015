//! Indexed chain state (schema `dalp_indexed`, role `dalp_indexer_svc`): chains, blocks,
//! transactions, event logs with the token events we decode, ERC-20 transfers, balances now
//! and at any past block, total supply history, role events and per-chain checkpoints; the
//! reorg-safe bulk ingest path ([`IndexedStore::ingest`]) and the EVM JSON-RPC follower
//! ([`follow`]) that feeds it.
//!
//! The SQL of schema `dalp_indexed` lives in `migrations/` beside this crate and is embedded
//! in the binary; [`ACCESS`] declares which roles may do what in it, and `dalp roles
//! check` compares that declaration with the live database.

pub mod decode;
pub mod follow;
pub mod numeric;
pub mod reconcile;
pub mod rpc;
pub mod store;
pub mod synth;
pub mod types;

pub use store::{IndexError, IndexedStore};

use dalp_db::partitions::PartitionPolicy;
use dalp_db::{Migration, MigrationSet, Privs, RoleGrant, SchemaAccess};

/// The schema this crate owns.
pub const SCHEMA: &str = "dalp_indexed";

/// Embedded migrations of [`SCHEMA`], in order.
pub const MIGRATIONS: MigrationSet = MigrationSet {
    schema: SCHEMA,
    migrations: &[
        Migration {
            version: 1,
            name: "init",
            sql: include_str!("../migrations/0001_init.sql"),
        },
        Migration {
            version: 2,
            name: "chain_data",
            sql: include_str!("../migrations/0002_chain_data.sql"),
        },
        Migration {
            version: 3,
            name: "divergence_and_reconciliation",
            sql: include_str!("../migrations/0003_divergence_and_reconciliation.sql"),
        },
    ],
};

/// The indexer reads and writes (DELETE for reorg rollback); reporting reads public chain data.
pub const ACCESS: SchemaAccess = SchemaAccess {
    schema: SCHEMA,
    grants: &[
        RoleGrant {
            role: "dalp_indexer_svc",
            tables: Privs::READ_WRITE,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_readonly",
            tables: Privs::READ,
            overrides: &[],
        },
    ],
};

const fn monthly(table: &'static str) -> PartitionPolicy {
    PartitionPolicy {
        schema: SCHEMA,
        table,
        ahead_months: 3,
        // Chain data can always be re-read from the chain: no retention by default.
        retention_months: None,
        retention_log: None,
    }
}

/// The time-partitioned tables (by block time, monthly) and how they are kept by default.
pub const PARTITIONS: [PartitionPolicy; 4] = [
    monthly("transactions"),
    monthly("logs"),
    monthly("transfers"),
    monthly("balance_history"),
];
