//! Audit and compliance evidence: append-only activity records (schema `dalp_audit`); every writer role may INSERT, none may UPDATE, DELETE or TRUNCATE.
//!
//! The SQL of schema `dalp_audit` lives in `migrations/` beside this crate and is embedded
//! in the binary; [`ACCESS`] declares which roles may do what in it, and `dalp roles
//! check` compares that declaration with the live database.

pub mod chain;
mod event;
pub mod export;
pub mod group;
pub mod seal;
pub mod verify;
pub mod witness;

pub use chain::{AuditKey, Checkpoint, TrustedKeys};
pub use event::{record, record_many, AuditEvent, Outcome, RequestContext};
pub use group::GroupWriter;
pub use seal::Sealer;
pub use verify::{verify, verify_window, verify_with, Problem, VerifyOptions, VerifyReport};
pub use witness::Witness;

use dalp_db::{Migration, MigrationSet, Privs, RoleGrant, SchemaAccess};

/// The schema this crate owns.
pub const SCHEMA: &str = "dalp_audit";

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
            name: "request_context",
            sql: include_str!("../migrations/0002_request_context.sql"),
        },
        Migration {
            version: 3,
            name: "partitions_and_seals",
            sql: include_str!("../migrations/0003_partitions_and_seals.sql"),
        },
        Migration {
            version: 4,
            name: "forwarding",
            sql: include_str!("../migrations/0004_forwarding.sql"),
        },
        Migration {
            version: 5,
            name: "writer_metadata",
            sql: include_str!("../migrations/0005_writer_metadata.sql"),
        },
        Migration {
            version: 6,
            name: "key_rotation",
            sql: include_str!("../migrations/0006_key_rotation.sql"),
        },
    ],
};

/// What every domain writer may do here: append events, nothing else.
const WRITER: &[(&str, Privs)] = &[("events", Privs::INSERT)];

/// Every domain writer may append events (INSERT only); the sealer reads events and appends
/// seal batches; the auditor reads everything. Reporting has no access: audit records carry
/// actors and source addresses.
pub const ACCESS: SchemaAccess = SchemaAccess {
    schema: SCHEMA,
    grants: &[
        RoleGrant {
            role: "dalp_identity_svc",
            tables: Privs::NONE,
            overrides: WRITER,
        },
        RoleGrant {
            role: "dalp_assets_svc",
            tables: Privs::NONE,
            overrides: WRITER,
        },
        RoleGrant {
            role: "dalp_indexer_svc",
            tables: Privs::NONE,
            overrides: WRITER,
        },
        RoleGrant {
            role: "dalp_workflows_svc",
            tables: Privs::NONE,
            overrides: WRITER,
        },
        RoleGrant {
            role: "dalp_auditor",
            tables: Privs::READ,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_audit_sealer",
            tables: Privs::NONE,
            overrides: &[
                ("events", Privs::READ),
                ("retention_log", Privs::READ),
                ("seal_batches", Privs::SELECT.union(Privs::INSERT)),
                (
                    "forward_cursors",
                    Privs::SELECT.union(Privs::INSERT).union(Privs::UPDATE),
                ),
            ],
        },
    ],
};

/// Monthly partitions, three months ahead, kept seven years; drops are recorded.
pub const PARTITIONS: dalp_db::partitions::PartitionPolicy = dalp_db::partitions::PartitionPolicy {
    schema: SCHEMA,
    table: "events",
    ahead_months: 3,
    retention_months: Some(7 * 12),
    retention_log: Some("dalp_audit.retention_log"),
};
