//! The component roles: who connects to the database, under which name.

use std::fmt;

/// NOLOGIN role that owns every dalp schema and object. Migrations run as this role.
pub const OWNER_ROLE: &str = "dalp_owner";

/// LOGIN role for administrators: a member of [`OWNER_ROLE`] (no superuser) that may log in
/// only over TLS with a client certificate issued to it by the cluster's CA *and* its
/// password; every statement it runs is audited (pgAudit session logging).
pub const ADMIN_ROLE: &str = "dalp_admin";

/// The built-in role whose membership lets [`Component::Monitor`] read replication and
/// archiver state.
pub const MONITOR_GROUP: &str = "pg_monitor";

/// LOGIN role used to run migrations: a member of [`OWNER_ROLE`] that does `SET ROLE`
/// to it, so everything it creates is owned by the owner role.
pub const MIGRATOR_ROLE: &str = "dalp_migrator";

/// NOLOGIN role whose grants select the tables pgAudit object-audits (`pgaudit.role`): a
/// SELECT grant on a PII table makes every read of it an AUDIT log entry.
pub const PGAUDIT_ROLE: &str = "dalp_pgaudit";

/// A dalp component that connects with its own login role and pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// Identity service: users, sessions, credentials (schema `dalp_identity`).
    Identity,
    /// Asset configuration service (schema `dalp_assets`).
    Assets,
    /// Chain indexer (schema `dalp_indexed`).
    Indexer,
    /// Workflow engine (schema `dalp_workflows`).
    Workflows,
    /// Read-only access to the audit trail.
    Auditor,
    /// Reporting: read-only on non-PII data.
    Readonly,
    /// Seals committed audit events into the hash chain (reads events, appends batches).
    AuditSealer,
    /// Health and metrics: a member of `pg_monitor` (replication, archiver and statistics
    /// views), with no access to any dalp schema.
    Monitor,
}

impl Component {
    pub const ALL: [Component; 8] = [
        Component::Identity,
        Component::Assets,
        Component::Indexer,
        Component::Workflows,
        Component::Auditor,
        Component::Readonly,
        Component::AuditSealer,
        Component::Monitor,
    ];

    /// The PostgreSQL login role of this component.
    pub fn role(self) -> &'static str {
        match self {
            Component::Identity => "dalp_identity_svc",
            Component::Assets => "dalp_assets_svc",
            Component::Indexer => "dalp_indexer_svc",
            Component::Workflows => "dalp_workflows_svc",
            Component::Auditor => "dalp_auditor",
            Component::Readonly => "dalp_readonly",
            Component::AuditSealer => "dalp_audit_sealer",
            Component::Monitor => "dalp_monitor",
        }
    }

    /// `application_name` the component's connections carry, so `pg_stat_activity` and
    /// `pg_stat_statements` can attribute load to it.
    pub fn application_name(self) -> &'static str {
        match self {
            Component::Identity => "dalp-identity",
            Component::Assets => "dalp-assets",
            Component::Indexer => "dalp-indexer",
            Component::Workflows => "dalp-workflows",
            Component::Auditor => "dalp-auditor",
            Component::Readonly => "dalp-readonly",
            Component::AuditSealer => "dalp-audit-sealer",
            Component::Monitor => "dalp-monitor",
        }
    }

    pub fn from_role(role: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.role() == role)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.role())
    }
}

/// Every login role dalp creates: the component roles plus the migrator.
pub fn login_roles() -> impl Iterator<Item = &'static str> {
    Component::ALL
        .into_iter()
        .map(Component::role)
        .chain(std::iter::once(MIGRATOR_ROLE))
}
