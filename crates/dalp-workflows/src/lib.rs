//! Workflow engine state: runs, step journal, work queue (schema `dalp_workflows`, role `dalp_workflows_svc`).
//!
//! The SQL of schema `dalp_workflows` lives in `migrations/` beside this crate and is embedded
//! in the binary; [`ACCESS`] declares which roles may do what in it, and `dalp roles
//! check` compares that declaration with the live database.

pub mod engine;
pub mod txreq;
pub mod worker;

pub use engine::{NewRun, Outcome, Run, WorkflowError, WorkflowStore};
pub use txreq::{
    stranded_per_signer, NewTxRequest, SignerStrands, StrandedNonce, TransitionInput, TxRequest,
    TxStatus,
};

use dalp_db::{Migration, MigrationSet, Privs, RoleGrant, SchemaAccess};

/// The schema this crate owns.
pub const SCHEMA: &str = "dalp_workflows";

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
            name: "engine",
            sql: include_str!("../migrations/0002_engine.sql"),
        },
        Migration {
            version: 3,
            name: "nonce_bindings",
            sql: include_str!("../migrations/0003_nonce_bindings.sql"),
        },
    ],
};

/// The workflow engine reads and writes; reporting reads run state.
pub const ACCESS: SchemaAccess = SchemaAccess {
    schema: SCHEMA,
    grants: &[
        RoleGrant {
            role: "dalp_workflows_svc",
            tables: Privs::READ_WRITE,
            // Broadcast nonces only grow.
            overrides: &[("broadcast_nonces", Privs::SELECT.union(Privs::INSERT))],
        },
        RoleGrant {
            role: "dalp_readonly",
            tables: Privs::READ,
            overrides: &[],
        },
    ],
};
