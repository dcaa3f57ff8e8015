//! Identity and access: organisations, users, credentials, sessions (schema `dalp_identity`, role `dalp_identity_svc`).
//!
//! The SQL of schema `dalp_identity` lives in `migrations/` beside this crate and is embedded
//! in the binary; [`ACCESS`] declares which roles may do what in it, and `dalp roles
//! check` compares that declaration with the live database.

pub mod crypto;
pub mod store;
pub mod totp;
pub mod types;

pub use store::{IdentityError, IdentityStore, Principal, RequestContext};

use dalp_db::{Migration, MigrationSet, Privs, RoleGrant, SchemaAccess};

/// The schema this crate owns.
pub const SCHEMA: &str = "dalp_identity";

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
            name: "access",
            sql: include_str!("../migrations/0002_access.sql"),
        },
        Migration {
            version: 3,
            name: "pgaudit_objects",
            sql: include_str!("../migrations/0003_pgaudit_objects.sql"),
        },
        Migration {
            version: 4,
            name: "mfa_attempts",
            sql: include_str!("../migrations/0004_mfa_attempts.sql"),
        },
    ],
};

/// The identity service reads and writes everything here; reporting may read only the
/// tables without personal data.
pub const ACCESS: SchemaAccess = SchemaAccess {
    schema: SCHEMA,
    grants: &[
        RoleGrant {
            role: "dalp_identity_svc",
            tables: Privs::READ_WRITE,
            overrides: &[],
        },
        RoleGrant {
            role: "dalp_readonly",
            tables: Privs::NONE,
            overrides: &[("organisations", Privs::READ)],
        },
    ],
};
