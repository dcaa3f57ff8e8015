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
pub const PARTITIONS: [dalp_db::partitions::PartitionPolicy; 5] = [
    dalp_audit::PARTITIONS,
    dalp_indexed::PARTITIONS[0],
    dalp_indexed::PARTITIONS[1],
    dalp_indexed::PARTITIONS[2],
    dalp_indexed::PARTITIONS[3],
];

/// What `dalp db lint` and `dalp doctor` check: the five schemas, every partitioned table,
/// bloat above 20 % dead tuples, scan and bloat checks on tables of 10,000 rows or more.
pub fn lint_options() -> dalp_db::analysis::LintOptions {
    dalp_db::analysis::LintOptions {
        schemas: ACCESS.iter().map(|a| a.schema.to_string()).collect(),
        partitions: PARTITIONS.to_vec(),
        bloat_ratio: 0.2,
        min_rows: 10_000,
    }
}

/// How long time-partitioned data is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Audit events (the data-protection policy: 7 years).
    pub audit_months: u32,
    /// Indexed chain data (re-readable from the chain); `None` keeps everything.
    pub indexed_months: Option<u32>,
}

/// The partition policies with these retentions.
pub fn partition_policies(retention: Retention) -> Vec<dalp_db::partitions::PartitionPolicy> {
    PARTITIONS
        .iter()
        .map(|p| {
            let mut p = *p;
            if p.schema == dalp_audit::SCHEMA {
                p.retention_months = Some(retention.audit_months);
            } else if p.schema == dalp_indexed::SCHEMA {
                p.retention_months = retention.indexed_months;
            }
            p
        })
        .collect()
}
