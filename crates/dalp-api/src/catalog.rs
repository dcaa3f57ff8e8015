//! The five domain schemas this service composes, in migration order.

use dalp_db::{MigrationSet, SchemaAccess};

/// Every embedded migration set, applied in this order.
pub const MIGRATIONS: [MigrationSet; 5] = [
    dalp_identity::MIGRATIONS,
    dalp_assets::MIGRATIONS,
    dalp_indexed::MIGRATIONS,
    dalp_workflows::MIGRATIONS,
    dalp_audit::MIGRATIONS,
];

/// Every schema's declared access, for `dalp roles check`.
pub const ACCESS: [SchemaAccess; 5] = [
    dalp_identity::ACCESS,
    dalp_assets::ACCESS,
    dalp_indexed::ACCESS,
    dalp_workflows::ACCESS,
    dalp_audit::ACCESS,
];

/// Every time-partitioned table and how it is kept.
pub const PARTITIONS: [dalp_db::partitions::PartitionPolicy; 1] = [dalp_audit::PARTITIONS];
