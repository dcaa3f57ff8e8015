//! The connection layer shared by every dalp component.
//!
//! `dalp-db` owns how dalp reaches PostgreSQL: the typed configuration, TLS with full
//! certificate verification, one pool per component role, the migration runner that applies
//! each domain crate's embedded migrations, and the declared role × schema × privilege matrix
//! with the check that compares it with what the database really grants. It owns no domain
//! tables; each domain crate brings its own migrations and access declaration.

pub mod access;
pub mod analysis;
pub mod cache;
pub mod component;
pub mod config;
pub mod connect;
pub mod ha;
pub mod migrate;
pub mod partitions;
pub mod pool;
pub mod roles;
pub mod secrets;
pub mod sql;
pub mod typed;
pub mod write;

pub use access::{Privs, RoleGrant, SchemaAccess};
pub use component::{Component, MIGRATOR_ROLE, OWNER_ROLE};
pub use config::DatabaseConfig;
pub use connect::{ConnectError, ConnectOptions};
pub use migrate::{Migration, MigrationSet};
pub use pool::ComponentPools;
pub use secrets::Secrets;
pub use typed::TypedClient;
pub use write::{Record, WriteError, Writer};
