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

/// Every time-partitioned table and how it is kept (defaults).
pub const PARTITIONS: [dalp_db::partitions::PartitionPolicy; 1] = [dalp_audit::PARTITIONS];

/// The partition policies with the audit retention set to `audit_retention_months`.
pub fn partition_policies(
    audit_retention_months: u32,
) -> Vec<dalp_db::partitions::PartitionPolicy> {
    PARTITIONS
        .iter()
        .map(|p| {
            let mut p = *p;
            if p.schema == dalp_audit::SCHEMA && p.table == dalp_audit::PARTITIONS.table {
                p.retention_months = Some(audit_retention_months);
            }
            p
        })
        .collect()
}
