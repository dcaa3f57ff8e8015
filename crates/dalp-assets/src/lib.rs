//! Asset configuration: templates, assets, compliance settings (schema `dalp_assets`, role `dalp_assets_svc`).
//!
//! The SQL of schema `dalp_assets` lives in `migrations/` beside this crate and is embedded
//! in the binary; [`ACCESS`] declares which roles may do what in it, and `dalp roles
//! check` compares that declaration with the live database.

pub mod compliance;
pub mod settings;
pub mod store;
pub mod templates;
pub mod types;

pub use store::{AssetError, AssetStore};

use dalp_db::{Migration, MigrationSet, Privs, RoleGrant, SchemaAccess};

/// The schema this crate owns.
pub const SCHEMA: &str = "dalp_assets";

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
            name: "change_control",
            sql: include_str!("../migrations/0002_change_control.sql"),
        },
        Migration {
            version: 3,
            name: "settings_and_fx",
            sql: include_str!("../migrations/0003_settings_and_fx.sql"),
        },
        Migration {
            version: 4,
            name: "compliance",
            sql: include_str!("../migrations/0004_compliance.sql"),
        },
        Migration {
            version: 5,
            name: "templates",
            sql: include_str!("../migrations/0005_templates.sql"),
        },
        Migration {
            version: 6,
            name: "type_details",
            sql: include_str!("../migrations/0006_type_details.sql"),
        },
        Migration {
            version: 7,
            name: "fk_indexes",
            sql: include_str!("../migrations/0007_fk_indexes.sql"),
        },
    ],
};

/// The asset service reads and writes; reporting reads (asset configuration holds no PII).
pub const ACCESS: SchemaAccess = SchemaAccess {
    schema: SCHEMA,
    grants: &[
        RoleGrant {
            role: "dalp_assets_svc",
            tables: Privs::READ_WRITE,
            // History is append-only for the service.
            overrides: &[
                ("asset_versions", Privs::SELECT.union(Privs::INSERT)),
                ("settings_versions", Privs::SELECT.union(Privs::INSERT)),
                ("fx_latest", Privs::SELECT),
                ("compliance_versions", Privs::SELECT.union(Privs::INSERT)),
                ("template_versions", Privs::SELECT.union(Privs::INSERT)),
            ],
        },
        RoleGrant {
            role: "dalp_readonly",
            tables: Privs::READ,
            overrides: &[],
        },
    ],
};
