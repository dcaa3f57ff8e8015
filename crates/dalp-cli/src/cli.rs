//! The command line. Every flag carries its help text and default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// A local high-availability cluster: etcd + PostgreSQL nodes under Patroni with
    /// synchronous replication, on loopback. The processes outlive the command; `down`
    /// stops them. Every other verb accepts the cluster directory as --data-dir.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
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

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory: PostgreSQL data, TLS material, role passwords, logs.
    #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
    pub data_dir: PathBuf,
    /// PostgreSQL port on 127.0.0.1 and ::1 [default: the previous port if free, else any free port].
    #[arg(long)]
    pub pg_port: Option<u16>,
    /// HTTP API port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub api_port: u16,
    /// Serve the API over TLS with this PEM certificate chain (with --api-tls-key).
    #[arg(long)]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key for --api-tls-cert.
    #[arg(long)]
    pub api_tls_key: Option<PathBuf>,
    /// pgAudit session classes logged when pgAudit is installed (comma-separated: read,
    /// write, function, role, ddl, misc, misc_set, all, none).
    #[arg(long, default_value = "write, ddl, role")]
    pub pgaudit_log: String,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Log the plan of every statement slower than this many milliseconds (auto_explain).
    #[arg(long, default_value_t = 500)]
    pub slow_query_ms: u32,
    /// PostgreSQL's max_connections (embedded instance). Clients beyond it belong behind
    /// `dalp pool up`.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(20..=5000))]
    pub max_connections: u32,
    /// Seed a demo organisation, an administrator (password printed once), a bond and a
    /// stablecoin, unless they exist.
    #[arg(long)]
    pub demo: bool,
    /// Run on a local HA cluster (Patroni + etcd, synchronous replication) in --data-dir
    /// instead of a single embedded instance: started if it is not running, stopped on exit
    /// if this command started it.
    #[arg(long)]
    pub ha: bool,
    #[command(flatten)]
    pub ha_opts: HaArgs,
}

/// Shape and timings of a local HA cluster.
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

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup now (then expire what the policy no longer keeps).
    Run {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// full, diff (changes since the last full) or incr (since the last backup).
        #[arg(long = "type", default_value = "full", value_parser = ["full", "diff", "incr"])]
        kind: String,
        /// Repository: 1 (daily tier, PITR) or 2 (long-term archive).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        repo: u8,
    },
    /// Backups in both repositories (type, time, duration, size, WAL range) and the window
    /// each can restore to: from the oldest backup whose WAL is still archived to the newest
    /// archived WAL.
    List {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Recovery evidence from the audit trail: every backup (WAL range, sizes, duration),
    /// restore drill (outcome, recovery time) and restore (target, RTO achieved), newest
    /// first — when recovery was last proven and how long it took.
    Evidence {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// At most this many, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Print the schedule that implements the policy: cron (default) or systemd units
    /// calling `dalp backup due`.
    Schedule {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Print a systemd service + timer instead of a crontab line.
        #[arg(long)]
        systemd: bool,
    },
    /// Run whatever the policy says is due now (any scheduler can call this often).
    Due {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Only say what is due.
        #[arg(long)]
        dry_run: bool,
    },
    /// Restore drill: restore the latest backup to a fresh restore point in a scratch
    /// directory, start it, run pg_amcheck, the migration status and the audit chain
    /// verification, compare row counts and checksums of every domain table with the
    /// source at that point, report the recovery time, clean up. Exit 1 on any mismatch.
    Verify {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        repo: u8,
        /// Keep the scratch copy (stopped) for inspection.
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["target_time", "target_lsn", "latest"])))]
pub struct RestoreArgs {
    /// The instance whose backups to restore (`dalp up` or `dalp cluster up` directory).
    #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
    pub data_dir: PathBuf,
    /// Recover to this moment: RFC 3339 (2026-11-24T10:15:00Z) or "2026-11-24 10:15:00+00".
    #[arg(long)]
    pub target_time: Option<String>,
    /// Recover to this WAL position (e.g. 0/3000060).
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Recover everything archived.
    #[arg(long)]
    pub latest: bool,
    /// New directory for the copy (must not exist or be empty).
    #[arg(long)]
    pub into: PathBuf,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub repo: u8,
    /// The instance is lost (disk or host): rebuild it in --into from the repository and
    /// this key bundle (`dalp keys export`) instead of from --data-dir. The result is a
    /// complete data directory; `dalp up --data-dir INTO` starts it, and archiving goes on
    /// into the same repository on a new timeline.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// File holding the key bundle's passphrase [default: DALP_KEYS_PASSPHRASE, else one
    /// line from stdin].
    #[arg(long, requires = "keys")]
    pub passphrase_file: Option<PathBuf>,
    /// With --keys: repo1 is now at this path (a posix repository moved or mounted
    /// elsewhere), instead of where the bundle's backup.toml says.
    #[arg(long, requires = "keys")]
    pub repo1_path: Option<PathBuf>,
    /// With --keys: the synchronous WAL receiver's directory is now here, instead of where
    /// the bundle's backup.toml says (its segments are replayed after the archive's).
    #[arg(long, requires = "keys")]
    pub wal_receiver_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Replace the server certificate and key with new ones from the same CA and make every
    /// running server (and a running pooler) load them; connections stay up and clients
    /// keep verifying against the unchanged CA.
    Rotate {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Client certificates for `dalp_admin`.
    Cert {
        #[command(subcommand)]
        command: AdminCertCommand,
    },
    /// Open psql as `dalp_admin` with a client certificate; psql asks for the password.
    /// Every statement of the session is audited.
    Psql {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// The certificate `dalp admin cert issue` wrote.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key.
        #[arg(long)]
        key: PathBuf,
        /// Extra arguments for psql (after --), e.g. -- -c "select 1".
        #[arg(last = true)]
        psql_args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCertCommand {
    /// Issue a client certificate (CN dalp_admin, OU NAME) signed by the cluster's CA. The
    /// private key is written 0600 to --out and not kept by dalp.
    Issue {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Who it is for (recorded in the certificate and the issue log).
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. 8h, 30m, 1d (at most 7d).
        #[arg(long, default_value = "8h")]
        ttl: String,
        /// Directory for NAME.crt and NAME.key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke a certificate: it goes on the CRL and the server reloads it at once.
    Revoke {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Serial number (hex) as `dalp admin cert list` shows it.
        #[arg(long)]
        serial: String,
    },
    /// Certificates issued so far, with expiry and revocation.
    List {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Run PgBouncer in front of the instance in --data-dir (embedded, or an HA cluster
    /// whose leader it follows) until Ctrl-C: transaction pooling, one pool per component
    /// role, SCRAM and TLS on both sides. Point `database.pooler` (dalp serve) at it;
    /// LISTEN keeps going directly to PostgreSQL.
    Up {
        /// Data directory of a running `dalp up`, or a `dalp cluster up` directory.
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Port on 127.0.0.1 [default: any free port].
        #[arg(long)]
        port: Option<u16>,
        /// Server connections per component role.
        #[arg(long, default_value_t = 20)]
        pool_size: u32,
        /// Client connections accepted in all.
        #[arg(long, default_value_t = 1000)]
        max_client_conn: u32,
        /// PgBouncer processes sharing the port (each single-threaded, with its own server
        /// pool); 0: one per CPU.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
        processes: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create (first time) or restart the cluster, wait until every replica streams with a
    /// synchronous standby, create roles and apply migrations; then return, leaving it running.
    Up {
        /// Cluster directory (data of every node, TLS material, secrets, logs).
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
        #[command(flatten)]
        ha: HaArgs,
        /// pgAudit session classes (see `dalp up --help`).
        #[arg(long, default_value = "write, ddl, role")]
        pgaudit_log: String,
        /// Log plans of statements slower than this many milliseconds.
        #[arg(long, default_value_t = 500)]
        slow_query_ms: u32,
    },
    /// Leader, synchronous standby, replicas, their lag and timeline (from Patroni's REST API).
    Status {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover: the leader hands over to the candidate (default: the synchronous
    /// standby) without losing committed writes.
    Switchover {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
        /// Node to promote, e.g. node2.
        #[arg(long)]
        candidate: Option<String>,
    },
    /// Start whatever piece of a running cluster has stopped (etcd, a node's Patroni), leaving
    /// the running ones alone, and wait until the cluster is healthy again.
    Heal {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
    },
    /// Stop every process of the cluster (Patroni stops its PostgreSQL first, then etcd).
    /// The data stays; `dalp cluster up` restarts it.
    Down {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
    },
}

/// How long time-partitioned data is kept (whole monthly partitions are dropped).
#[derive(Debug, Args, Clone, Copy)]
pub struct RetentionArgs {
    /// Months audit partitions are kept before retention drops them (recorded in the audit
    /// retention log).
    #[arg(long, default_value_t = 84, value_parser = clap::value_parser!(u32).range(1..=1200))]
    pub audit_retention_months: u32,
    /// Months indexed chain data (transactions, logs, transfers, balance history) is kept
    /// [default: forever; it can always be re-read from the chain].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1200))]
    pub indexed_retention_months: Option<u32>,
}

impl RetentionArgs {
    pub fn retention(self) -> dalp_app::catalog::Retention {
        dalp_app::catalog::Retention {
            audit_months: self.audit_retention_months,
            indexed_months: self.indexed_retention_months,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Print a libpq URL (sslmode=verify-full, sslrootcert set) for a role of the embedded
    /// instance; it contains the role's password, and `psql` accepts it as is.
    Url {
        /// Data directory of the embedded instance.
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Login role, e.g. dalp_indexer_svc, dalp_auditor, dalp_readonly, dalp_migrator.
        #[arg(long)]
        role: String,
        /// Connect through a pooler on this 127.0.0.1 port (see `dalp pool up`) instead
        /// of PostgreSQL itself.
        #[arg(long)]
        port: Option<u16>,
    },
    /// The heaviest statements (pg_stat_statements) with the component that ran them:
    /// calls, total and mean time, and a rough p95 (mean + 2 standard deviations).
    Top {
        #[command(flatten)]
        target: TargetArgs,
        /// total, mean or calls.
        #[arg(long, default_value = "total")]
        by: String,
        #[arg(long, default_value_t = 15)]
        limit: i64,
        /// Only this component's statements (identity, assets, indexer, workflows, auditor,
        /// readonly, audit-sealer, migrator).
        #[arg(long)]
        component: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Generic plans of a component's heaviest statements (from pg_stat_statements), to see
    /// which indexes its hot queries use. Plans of slow statements as they ran are in the
    /// server log (auto_explain).
    Explain {
        #[command(flatten)]
        target: TargetArgs,
        /// identity, assets, indexer, workflows, auditor, readonly, audit-sealer or migrator.
        #[arg(long)]
        component: String,
        /// total, mean or calls.
        #[arg(long, default_value = "total")]
        by: String,
        #[arg(long, default_value_t = 5)]
        limit: i64,
    },
    /// Index coverage and health: unindexed foreign keys, duplicate and unused indexes,
    /// tables read by sequential scans, bloat on the workflow tables, partitions missing
    /// ahead. Exits 1 when a finding is at or above --fail-on.
    Lint {
        #[command(flatten)]
        target: TargetArgs,
        /// info, warning or error.
        #[arg(long, default_value = "warning")]
        fail_on: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// Print the actual role × schema × privilege matrix; exit 1 if it differs from the
    /// declared one.
    Check {
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create dalp's roles on an external cluster (needs CREATEROLE, e.g. the managed
    /// service's admin user) and prepare the database. Passwords come from --secrets-file,
    /// which is generated (mode 0600) when it does not exist.
    Create {
        /// Admin connection URL (sslmode=verify-full).
        #[arg(long, env = "DALP_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// JSON file with the role passwords.
        #[arg(long)]
        secrets_file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (unknown keys, types, values) with the environment applied,
    /// and print the effective configuration without secrets.
    Check {
        /// The TOML file.
        #[arg(long, env = "DALP_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a platform administrator (role `admin`) so a fresh instance can be used at once.
    /// The password is read from standard input when it is not a terminal, else prompted twice.
    /// The admin must enrol TOTP at first login (POST /api/v1/mfa/totp).
    CreateAdmin {
        #[command(flatten)]
        instance: InstanceArgs,
        /// The administrator's email address.
        #[arg(long)]
        email: String,
        /// Display name [default: the part of the email before @].
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a new key-encryption key, make it active and re-wrap every data key under it.
    /// Records stay readable throughout; the old key stays in the key file.
    Rotate {
        #[command(flatten)]
        instance: InstanceArgs,
    },
    /// Seal everything a restore needs besides the backup repository into one file under a
    /// passphrase (Argon2id + AES-256-GCM): role passwords, PII key-encryption keys, audit
    /// keys and witness, the repositories' cipher passphrase, the TLS CA and certificate,
    /// the backup policy. Keep it apart from the repository; `dalp restore --keys` uses it
    /// when the instance is lost. Export again after `keys rotate`, `audit rotate-key` or
    /// `tls rotate`.
    Export {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Where to write the bundle (created 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// File holding the passphrase (at least 12 characters) [default:
        /// DALP_KEYS_PASSPHRASE, else one line from stdin].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
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

/// How messages reach a SIEM.
#[derive(Debug, Args, Clone)]
pub struct SiemArgs {
    /// CA bundle the receiver's certificate must chain to (required for a SIEM target).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The SD-ID of the structured data carrying each event's context, NAME@PEN. The
    /// default uses 32473, the documentation-only enterprise number (RFC 5612); set your
    /// organisation's Private Enterprise Number.
    #[arg(long, default_value = dalp_audit::export::DEFAULT_SD_ID)]
    pub sd_id: String,
    /// Largest message in octets (at least 480); larger events have their details replaced
    /// by a size marker. rsyslog's default maxMessageSize is 8192.
    #[arg(long, default_value_t = dalp_audit::export::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// HOSTNAME in each message [default: this machine's host name].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Client certificate (PEM) for receivers that require mutual TLS, such as rsyslog's
    /// imrelp; with --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// Where the audit signing key is.
#[derive(Debug, Args, Clone)]
pub struct AuditKeyArgs {
    /// Trusted audit key files: public (audit-ed25519.pub.json) or signing keys; repeat for
    /// keys of earlier periods. A batch signed by any other key fails verification
    /// [default: DATA_DIR/keys/audit-ed25519.pub.json, else the signing key beside it].
    #[arg(long)]
    pub audit_key: Vec<PathBuf>,
    /// Directory of witnessed chain heads (heads.jsonl) to check the chain against
    /// [default: DATA_DIR/keys/audit-witness].
    #[arg(long)]
    pub witness: Option<PathBuf>,
    /// Check no witnessed heads (only the chain itself and any --checkpoint).
    #[arg(long, conflicts_with = "witness")]
    pub no_witness: bool,
    /// The retention policy in months: a retention drop of anything younger is forgery.
    #[arg(long, default_value_t = 84)]
    pub retention_months: u32,
    /// Start from the head the last successful verification reached (recorded in the
    /// witness directory): only what is new is recomputed. Run a full verification
    /// regularly as well; an incremental one does not re-read older history.
    #[arg(long, conflicts_with = "no_witness")]
    pub incremental: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the whole hash chain: links, hashes, signatures, every sealed event, no event
    /// inserted below the watermark, deletions only where retention recorded them. Exits 1
    /// and names the first broken batch and event on any tampering.
    Verify {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        key: AuditKeyArgs,
        /// A checkpoint exported earlier (`dalp audit checkpoint`): the chain must still reach it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Only batches sealed at or after this time (RFC 3339), linked to the one before.
        #[arg(long)]
        from: Option<String>,
        /// Only batches sealed before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export sealed events in sequence order to a file (or standard output) or a SIEM,
    /// with progress. To a SIEM the connection ends with TLS close_notify and the export
    /// fails (exit 1) unless the receiver confirms it read everything.
    Export {
        #[command(flatten)]
        target: TargetArgs,
        /// jsonl, csv, cef or rfc5424 (to a SIEM: the body inside the RFC 5424 message;
        /// csv is for files only).
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// A file, syslog+tls://HOST:PORT or relp+tls://HOST:PORT [default: standard output].
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        siem: SiemArgs,
    },
    /// Ship sealed events to a SIEM continuously, resuming from a durable cursor after any
    /// restart. At-least-once: the cursor moves only past what the receiver is known to hold
    /// (RELP: acknowledged by the receiver; syslog: acknowledged by its TCP stack with the
    /// connection still open --settle-ms later); after a reconnect what was in flight is sent
    /// again, each message carrying its sequence number (seq=) for the SIEM to drop
    /// duplicates. Runs until Ctrl-C, then closes with TLS close_notify.
    Forward {
        #[command(flatten)]
        target: TargetArgs,
        /// syslog+tls://HOST:PORT (RFC 5425) or relp+tls://HOST:PORT (acknowledged delivery).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        siem: SiemArgs,
        /// Cursor name; each destination keeps its own.
        #[arg(long, default_value = "default")]
        name: String,
        /// The message body inside the RFC 5424 header: rfc5424 (the event's details as
        /// JSON), cef or jsonl.
        #[arg(long, default_value = "rfc5424")]
        format: String,
        /// Events per batch.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Syslog only: milliseconds the connection must stay open after the receiver's TCP
        /// stack acknowledged a batch before the batch counts as delivered.
        #[arg(long, default_value_t = 2000)]
        settle_ms: u64,
        /// Also ship pgAudit's AUDIT entries from the JSON server logs in this directory
        /// (the embedded instance's is DATA_DIR/log).
        #[arg(long)]
        pgaudit_logs: Option<PathBuf>,
    },
    /// Rotate the audit signing key: seal what is pending, append a batch signed by the
    /// current key that names the new one (so verifiers trusting the first key follow it),
    /// install the new key and keep the old one as audit-ed25519.<id>.retired.json. A
    /// running dalp picks the new key up at its next seal. Safe to run again if interrupted.
    RotateKey {
        #[command(flatten)]
        instance: InstanceArgs,
    },
    /// Print (or write) the latest signed batch head, to anchor the chain outside the database.
    Checkpoint {
        #[command(flatten)]
        target: TargetArgs,
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Follow an EVM JSON-RPC node: ingest blocks, transactions and token events batch by
    /// batch (each batch commits with its checkpoint, so a restart or kill resumes exactly),
    /// detect reorgs from parent hashes and roll back to the fork point. Runs until Ctrl-C,
    /// or with --once until it has caught up with the node's head. Connects as
    /// dalp_indexer_svc (or the --database-url user).
    Follow {
        #[command(flatten)]
        target: TargetArgs,
        /// JSON-RPC endpoint of the node, e.g. http://127.0.0.1:8545.
        #[arg(long)]
        rpc: String,
        /// Chain id; the node must report the same (eth_chainId).
        #[arg(long)]
        chain_id: i64,
        /// First block to index when the chain has no checkpoint yet (later runs resume
        /// from the checkpoint). Balances are exact when this is at or before the tokens'
        /// deployment.
        #[arg(long, default_value_t = 0)]
        from_block: u64,
        /// Only these contracts' logs and transactions (comma-separated addresses)
        /// [default: every log and transaction].
        #[arg(long, value_delimiter = ',')]
        contracts: Vec<String>,
        /// Blocks per batch (one transaction).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        batch: u64,
        /// Milliseconds between polls once caught up.
        #[arg(long, default_value_t = 2000)]
        poll_ms: u64,
        /// Exit once the checkpoint has reached the node's head.
        #[arg(long)]
        once: bool,
        /// Give up (exit 1 with the last error) after this many consecutive failed attempts
        /// to reach the node or the database [default: 8 with --once, else retry forever].
        #[arg(long)]
        give_up_after: Option<u32>,
        /// Name to register the chain under if it is not registered yet.
        #[arg(long)]
        name: Option<String>,
        /// Reorgs deeper than this many blocks are refused (set when registering the chain).
        #[arg(long, default_value_t = 64)]
        finality_depth: i32,
        /// Read blocks as full transaction objects plus `eth_getLogs` instead of headers
        /// plus `eth_getBlockReceipts` (used by default, and given up automatically on a
        /// node without it).
        #[arg(long)]
        no_block_receipts: bool,
        /// Seconds between reconciliation rounds while following (compare indexed supply
        /// and sampled balances with the contracts at the finalized block; see `dalp index
        /// reconcile`); 0 turns it off. Not run with --once.
        #[arg(long, default_value_t = 600)]
        reconcile_every_secs: u64,
        #[command(flatten)]
        reconcile: ReconcileArgs,
    },
    /// Show a chain's sync status: checkpoint, finalized block, head and lag, whether it
    /// diverged from its node, the last reconciliation per token, row counts. Exit 1 when
    /// the chain is diverged or a token disagrees with its contract.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        chain_id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Roll a chain's index back to a block (everything above it is removed and re-indexed
    /// by the next `dalp index follow`). Within the finality depth by default; with
    /// --beyond-finality any block, or -1 to empty the chain's index and re-index from
    /// scratch. This also ends a divergence (the operator decides where indexing resumes).
    Rewind {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        chain_id: i64,
        /// The last block to keep (-1: keep nothing).
        #[arg(long, allow_hyphen_values = true)]
        to: i64,
        /// Allow going below the finalized block (after a divergence, e.g. a node reset).
        #[arg(long)]
        beyond_finality: bool,
    },
    /// One reconciliation round: at the finalized block, compare each token's indexed supply
    /// with `totalSupply()` and a random sample of indexed balances with `balanceOf()` on the
    /// node; the result is kept per token (status, /metrics, doctor). Exit 1 when a token
    /// disagrees.
    Reconcile {
        #[command(flatten)]
        target: TargetArgs,
        /// JSON-RPC endpoint of the node.
        #[arg(long)]
        rpc: String,
        #[arg(long)]
        chain_id: i64,
        #[command(flatten)]
        reconcile: ReconcileArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// How much one reconciliation round compares.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Balances compared per token (a random sample of its holders).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub reconcile_sample: u32,
    /// Tokens per round (the least recently checked first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub reconcile_tokens: u32,
}

impl ReconcileArgs {
    pub fn options(&self) -> dalp_indexed::reconcile::ReconcileOptions {
        dalp_indexed::reconcile::ReconcileOptions {
            sample: self.reconcile_sample as usize,
            max_tokens: self.reconcile_tokens as usize,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Run a worker for the built-in kinds (the engine's self-test, `dalp.selftest`) until
    /// Ctrl-C: claims ready runs in batches, keeps leases alive, finishes in batches. A worker
    /// killed with -9 loses nothing: its leases expire and another worker resumes its runs
    /// from their step journals.
    Worker {
        #[command(flatten)]
        target: TargetArgs,
        /// Runs executed at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// Lease length; a worker that stops heartbeating loses its runs after this.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        lease_seconds: u64,
        /// Milliseconds between polls when idle (NOTIFY wakes it earlier on a direct connection).
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Base of the exponential retry backoff, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        retry_base_ms: u64,
    },
    /// Enqueue self-test runs (`dalp.selftest`): each executes --steps journaled steps that
    /// record one row each, so `dalp workflows show` can prove every step ran exactly once.
    Selftest {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10)]
        runs: u32,
        #[arg(long, default_value_t = 5)]
        steps: u32,
        /// Milliseconds between steps.
        #[arg(long, default_value_t = 100)]
        step_ms: u32,
    },
    /// Queue depth, running and stalled runs, dead letters, claim latency.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest change first.
    Runs {
        #[command(flatten)]
        target: TargetArgs,
        /// pending, running, sleeping, waiting, completed, failed, cancelled, dead_letter, or
        /// stalled (running with an expired lease).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one run (or transaction request) with its journal.
    Show {
        #[command(flatten)]
        target: TargetArgs,
        id: String,
    },
    /// Make a dead-lettered or failed run ready again (attempts reset).
    Retry {
        #[command(flatten)]
        target: TargetArgs,
        id: String,
    },
    /// Cancel a run that has not ended.
    Cancel {
        #[command(flatten)]
        target: TargetArgs,
        id: String,
    },
    /// Delete completed and cancelled runs (with their step journals) that ended more than
    /// --older-than-days ago; failed and dead-lettered runs stay for operators.
    Purge {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3650))]
        older_than_days: u64,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
