//! The command line. Every flag carries its help text and default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

// Each verb's flags live beside its `run`, in `commands/<verb>.rs`; this file lists the verbs
// and the arguments several verbs share.
use crate::commands::{
    admin::{AdminCommand, TlsCommand},
    audit::AuditCommand,
    backup::{BackupCommand, RestoreArgs},
    cluster::ClusterCommand,
    config::ConfigCommand,
    db::DbCommand,
    identity::UsersCommand,
    index::IndexCommand,
    keys::KeysCommand,
    maintenance::RetentionArgs,
    pool::PoolCommand,
    roles::RolesCommand,
    up::UpArgs,
    workflows::WorkflowsCommand,
};

/// dalp: the PostgreSQL data layer of the Digital Asset Lifecycle Platform.
///
/// `dalp up` runs an embedded, TLS-only PostgreSQL with the five domain schemas and the HTTP
/// API. The other verbs act on that instance (--data-dir) or on any reachable cluster
/// (--database-url).
#[derive(Debug, Parser)]
#[command(name = "dalp", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Which instance a verb acts on.
#[derive(Debug, Args, Clone)]
pub struct TargetArgs {
    /// Data directory of an embedded instance (created by `dalp up`).
    #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
    pub data_dir: PathBuf,
    /// Act on this cluster instead of the embedded one, e.g.
    /// postgres://dalp_migrator:PW@db.example:5432/dalp?sslmode=verify-full&sslrootcert=/ca.pem
    /// (only sslmode=verify-full is accepted). Takes precedence over --data-dir.
    #[arg(long, env = "DALP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the embedded cluster (initialising it on first use), apply migrations, create
    /// roles and serve the HTTP API until Ctrl-C or SIGTERM.
    Up(UpArgs),
    /// Show whether the cluster runs, its version and port, schema versions and roles.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Apply pending migrations (as a member of dalp_owner; never a superuser).
    Migrate {
        #[command(flatten)]
        target: TargetArgs,
        /// Show what would be applied without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Database helpers.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Roles and least privilege.
    Roles {
        #[command(subcommand)]
        command: RolesCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Platform users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Key-encryption keys for PII.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit trail: verify the sealed chain, export signed checkpoints and events.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Show time partitions and how far ahead they reach; with --apply, create missing ones
    /// and drop those past retention (recorded in the audit retention log).
    Partitions {
        #[command(flatten)]
        target: TargetArgs,
        /// Create and drop partitions instead of only showing them.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the deployment and explain what to do about each finding: TLS reachability,
    /// certificate expiry, migrations, the role matrix, partitions ahead, audit sealing,
    /// indexer progress, dead-lettered and stalled work. Exit code: 0 fine, 1 warnings,
    /// 2 errors.
    Doctor {
        #[command(flatten)]
        target: TargetArgs,
        /// Also check these certificates' expiry (PEM; repeatable) [default: the embedded
        /// instance's CA and server certificate, or the URL's sslrootcert].
        #[arg(long)]
        cert: Vec<PathBuf>,
        /// Warn when a certificate expires within this many days.
        #[arg(long, default_value_t = 30)]
        warn_days: i64,
        /// The target is a managed service (RDS, Cloud SQL, Azure): high availability,
        /// backups and point-in-time recovery are the provider's, reported as info with what
        /// to confirm in its console. Detected by itself from the provider's settings
        /// (rds.*, cloudsql.*, azure.*) when they are visible.
        #[arg(long, env = "DALP_MANAGED")]
        managed: bool,
        #[arg(long)]
        json: bool,
    },
    /// Indexed chain state: follow an EVM node, show sync status.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Workflow engine: run a worker, inspect runs and transaction requests, retry or
    /// cancel stuck work. Connects as dalp_workflows_svc (or the --database-url user).
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCommand,
    },
    /// A high-availability cluster: etcd + PostgreSQL nodes under Patroni with synchronous
    /// replication, on this host (`up`) or over several (`init` from a spec, then `dalp node
    /// up` on each host). The processes outlive the command; `down` stops them. Every other
    /// verb accepts the cluster directory as --data-dir.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// One host of a cluster made by `dalp cluster init`: start or stop what it runs.
    Node {
        #[command(subcommand)]
        command: crate::commands::node::NodeCommand,
    },
    /// Backups with pgBackRest: the policy's two repositories (repo1 daily fulls kept 90
    /// days with 30 days of point-in-time recovery, repo2 weekly fulls kept 7 years),
    /// scheduling, listing and restore drills. WAL is archived continuously by `dalp up`.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore a backup into a NEW directory, recover to the target and promote there, and
    /// start the copy on a free port (it keeps running; the source is never touched).
    Restore(RestoreArgs),
    /// Administrative access with two factors: a short-lived client certificate issued by
    /// the cluster's CA to `dalp_admin`, plus that role's password.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// TLS material of the instance.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Connection pooling with PgBouncer.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Serve the HTTP API against an external cluster described by a config file.
    Serve {
        /// TOML config file (see `dalp config check`); DALP_<SECTION>__<KEY> variables override it.
        #[arg(long, env = "DALP_CONFIG")]
        config: PathBuf,
    },
    /// Print the HTTP API's OpenAPI 3.1 document (the one GET /api/v1/openapi.json serves,
    /// generated from the handlers), e.g. to generate a client; needs no database.
    Openapi,
}

/// Which running dalp to act on as its component roles: the embedded instance (or local HA
/// cluster) in a data directory, or an external cluster described by `dalp serve`'s config.
#[derive(Debug, Args, Clone)]
pub struct InstanceArgs {
    /// Data directory of the embedded instance (it must be running).
    #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
    pub data_dir: PathBuf,
    /// `dalp serve`'s configuration file: an external or managed cluster (hosts, CA, role
    /// passwords, keys.dir). Takes precedence over --data-dir.
    #[arg(long, env = "DALP_CONFIG")]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

/// The shape of a local HA cluster (`dalp cluster up`, `dalp up --ha`).
#[derive(Debug, Args, Clone)]
pub struct HaArgs {
    /// PostgreSQL nodes (one primary, the rest replicas; one of them synchronous).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds a dead leader keeps the leader lock: the bound on failover time (Patroni's
    /// minimum is 20).
    #[arg(long, default_value_t = 20)]
    pub ttl: u32,
    /// Seconds between Patroni HA loop runs.
    #[arg(long, default_value_t = 2)]
    pub loop_wait: u32,
    /// Seconds Patroni retries etcd and PostgreSQL before giving up
    /// (loop_wait + 2 × retry_timeout must not exceed ttl).
    #[arg(long, default_value_t = 5)]
    pub retry_timeout: u32,
    /// Refuse writes while no synchronous standby is available, instead of continuing
    /// unreplicated (synchronous_mode_strict).
    #[arg(long)]
    pub sync_strict: bool,
    /// Do not archive WAL to pgBackRest (on by default when pgBackRest is installed;
    /// without it there is no point-in-time recovery).
    #[arg(long)]
    pub no_archive: bool,
}

impl HaArgs {
    pub fn options(&self, pgaudit_log: &str, slow_query_ms: u32) -> dalp_ops::HaOptions {
        dalp_ops::HaOptions {
            nodes: self.nodes,
            ttl: self.ttl,
            loop_wait: self.loop_wait,
            retry_timeout: self.retry_timeout,
            synchronous_mode_strict: self.sync_strict,
            pgaudit_log: Some(pgaudit_log.to_string()),
            slow_query_ms: Some(slow_query_ms),
            bin_dir: None,
            archive: !self.no_archive && dalp_ops::backup::available(),
        }
    }
}
