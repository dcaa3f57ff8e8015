//! Audit and compliance evidence: append-only activity records (schema `dalp_audit`); every writer role may INSERT, none may UPDATE, DELETE or TRUNCATE.
//!
//! The SQL of schema `dalp_audit` lives in `migrations/` beside this crate and is embedded
//! in the binary; [`ACCESS`] declares which roles may do what in it, and `dalp roles
//! check` compares that declaration with the live database.

mod event;

pub use event::{record, AuditEvent, Outcome};

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
    ],
};

/// Every domain writer may append (INSERT only); the auditor may read. Reporting has no
/// access: audit records carry actors and source addresses.
pub const ACCESS: SchemaAccess = SchemaAccess {
    schema: SCHEMA,
    grants: &[
        RoleGrant {
            role: "dalp_identity_svc",
            tables: Privs::INSERT,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_assets_svc",
            tables: Privs::INSERT,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_indexer_svc",
            tables: Privs::INSERT,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_workflows_svc",
            tables: Privs::INSERT,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_auditor",
            tables: Privs::READ,
            overrides: &[],
        },
    ],
};
