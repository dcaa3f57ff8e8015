//! A high-availability cluster: etcd (v3 API) and N PostgreSQL 15 nodes under Patroni, run
//! as the `postgres` system user. Every piece has a host (an address): `dalp cluster up`
//! puts one etcd and every node on 127.0.0.1 (one directory runs them all); a cluster made
//! from a spec (`dalp cluster init`, [`crate::spec`]) spreads them over hosts, and each
//! host's bundle directory runs only that host's pieces (`dalp node up`). The code is the
//! same: a directory's `cluster.json` names every piece and which hosts it runs (`runs`).
//!
//! etcd speaks TLS to clients and peers and requires a client certificate from both;
//! Patroni's REST API speaks TLS and accepts its write verbs (switchover, restart, …) only
//! with a client certificate from the cluster's CA. Each directory's `tls/server.crt` is that
//! host's certificate, for serving and as its client identity.
//!
//! Replication is synchronous (`synchronous_mode`), replicas stream over TLS
//! (`sslmode=verify-full`) with SCRAM as `dalp_replicator`, a former primary rejoins with
//! `pg_rewind` as `dalp_rewind`, and every node gets the same server settings, `pg_hba.conf`
//! and peer map as the embedded cluster (the superuser only over the local socket).
//!
//! The processes are daemons: they outlive the `dalp cluster up` that started them, and
//! `dalp cluster down` (or [`HaCluster::down`]) stops them by the pids recorded under the
//! cluster directory. Layout:
//! `cluster.json` (hosts, ports, timings), `secrets.json` (0600), `tls/`, per etcd member
//! `<member>/` + `<member>.pid` + `<member>.log`, and per node
//! `<node>/{patroni.yml, patroni.pid, patroni.log, guard.pid, guard.log, guard.events,
//! pgdata/, run/, log/}` (the guard: [`crate::guard`]).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dalp_db::connect::ConnectOptions;
use dalp_db::{roles, Secrets};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::embedded::{
    self, bootstrap_roles_and_database, free_port, hba_lines, ident_lines, server_settings,
    ServerConf, DATABASE, SUPERUSER,
};
use crate::error::OpsError;
use crate::guard::{self, GuardLimits, Judge, PatroniProbe};
use crate::pki;
use crate::process::{self, ServerUser};

/// Patroni's scope (cluster name) and etcd namespace.
pub const SCOPE: &str = "dalp";
/// The role replicas stream WAL as.
pub const REPLICATION_ROLE: &str = "dalp_replicator";
/// The role `pg_rewind` connects as when a former primary rejoins.
pub const REWIND_ROLE: &str = "dalp_rewind";
/// The user of Patroni's REST API for changing operations (switchover, restart).
pub const API_USER: &str = "dalp_patroni";

/// Where `scripts/deps.sh` installs the pinned Patroni (a virtualenv; `DALP_PATRONI` overrides).
pub const DEFAULT_PATRONI_BIN: &str = "/opt/dalp/venv/bin/patroni";
/// Debian 12 ships Patroni 3.0.2, whose etcd3 driver re-creates an expired leader key without
/// a revision check: a resumed old leader can take the key back and acknowledged writes on the
/// promoted primary are lost. Releases before this one are refused.
pub const MIN_PATRONI: (u32, u32, u32) = (3, 0, 3);
const ETCD_BIN: &str = "/usr/bin/etcd";
/// The kernel watchdog Patroni would use to fence a stalled primary (`dalp doctor` reports
/// its absence).
pub const WATCHDOG_DEVICE: &str = "/dev/watchdog";

/// The process name (and pid file) of a host's `pgbackrest server`.
const BACKUP_SERVER: &str = "pgbackrest-server";

/// The address of every piece of the one-host cluster.
pub const LOOPBACK: &str = "127.0.0.1";

/// PostgreSQL's binaries: `explicit`, else `DALP_PG_BIN`, else the default.
fn pg_bin(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("DALP_PG_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(embedded::DEFAULT_PG_BIN))
}

/// etcd, a Patroni without the known data-loss bug, and PostgreSQL are installed.
fn check_binaries() -> Result<(), OpsError> {
    if !Path::new(ETCD_BIN).exists() {
        return Err(err(
            format!("{ETCD_BIN} not found"),
            "install Debian's etcd-server package (scripts/deps.sh does)",
        ));
    }
    check_patroni(&patroni_bin())?;
    let bin = pg_bin(None);
    if !bin.join("postgres").exists() {
        return Err(OpsError::MissingBinary(bin.join("postgres")));
    }
    Ok(())
}

/// Creates `dir` if needed, opens it to the server user (0711) and returns its real path.
fn prepare_dir(dir: &Path, user: &ServerUser) -> Result<PathBuf, OpsError> {
    std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;
    let root =
        std::fs::canonicalize(dir).map_err(OpsError::io(format!("resolve {}", dir.display())))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
        .map_err(OpsError::io(format!("chmod {}", root.display())))?;
    user.check_traversable(&root)?;
    Ok(root)
}

/// Adds a password for every role a cluster needs that `secrets` lacks.
pub(crate) fn complete_secrets(secrets: &mut Secrets) {
    for r in [
        REPLICATION_ROLE,
        REWIND_ROLE,
        API_USER,
        dalp_db::component::ADMIN_ROLE,
    ]
    .into_iter()
    .chain(dalp_db::component::login_roles())
    {
        secrets
            .roles
            .entry(r.to_string())
            .or_insert_with(|| roles::generate_password(32));
    }
}

/// The Patroni executable: `DALP_PATRONI`, else the project's pinned virtualenv.
pub fn patroni_bin() -> PathBuf {
    std::env::var_os("DALP_PATRONI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATRONI_BIN))
}

/// Checks that `bin` is a Patroni without the known leader-key data-loss bug and returns its
/// version.
pub fn check_patroni(bin: &Path) -> Result<String, OpsError> {
    let out = Command::new(bin).arg("--version").output().map_err(|e| {
        err(
            format!("Patroni at {}", bin.display()),
            format!("{e}; scripts/deps.sh installs the pinned release into /opt/dalp/venv (or set DALP_PATRONI)"),
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let version = text.strip_prefix("patroni ").unwrap_or(&text).to_string();
    let parts: Vec<u32> = version
        .split('.')
        .map(|p| p.trim().parse().unwrap_or(0))
        .chain(std::iter::repeat(0))
        .take(3)
        .collect();
    if (parts[0], parts[1], parts[2]) < MIN_PATRONI {
        return Err(err(
            format!("Patroni {version} at {}", bin.display()),
            "this release can lose acknowledged writes when a stalled leader resumes (etcd3 leader key overwritten without a revision check); install the pinned release with scripts/deps.sh",
        ));
    }
    Ok(version)
}

/// How to build the cluster. The timings are Patroni's (seconds).
#[derive(Debug, Clone)]
pub struct HaOptions {
    pub nodes: usize,
    /// Leader lock lifetime: how long a dead leader keeps the lock (Patroni's minimum is 20).
    pub ttl: u32,
    /// Seconds between Patroni's HA loop runs.
    pub loop_wait: u32,
    /// How long Patroni retries etcd and PostgreSQL operations before giving up.
    pub retry_timeout: u32,
    /// Refuse writes when no synchronous standby is available (instead of degrading).
    pub synchronous_mode_strict: bool,
    pub pgaudit_log: Option<String>,
    pub slow_query_ms: Option<u32>,
    pub bin_dir: Option<PathBuf>,
    /// Archive WAL to pgBackRest (the primary archives; every node is configured, so
    /// archiving continues after a failover). Default on when pgBackRest is installed.
    pub archive: bool,
}

impl Default for HaOptions {
    /// Safe on 2 cores: a 2 s loop keeps three Patronis light, and ttl 20 s (Patroni's
    /// minimum) bounds how long a dead leader blocks writes.
    fn default() -> Self {
        HaOptions {
            nodes: 3,
            ttl: 20,
            loop_wait: 2,
            retry_timeout: 5,
            synchronous_mode_strict: false,
            pgaudit_log: None,
            slow_query_ms: None,
            bin_dir: None,
            archive: crate::backup::available(),
        }
    }
}

impl HaOptions {
    /// Checks the timings the way Patroni needs them: `loop_wait + 2 × retry_timeout ≤ ttl`.
    pub fn validate(&self) -> Result<(), OpsError> {
        let bad = |m: String| OpsError::Bootstrap {
            context: "HA cluster options".into(),
            message: m,
        };
        if !(1..=9).contains(&self.nodes) {
            return Err(bad(format!("--nodes {} must be 1 to 9", self.nodes)));
        }
        if self.ttl < 20 {
            return Err(bad(format!(
                "--ttl {} is below Patroni's minimum of 20 seconds",
                self.ttl
            )));
        }
        if self.loop_wait < 1 || self.retry_timeout < 3 {
            return Err(bad(
                "--loop-wait must be ≥ 1 and --retry-timeout ≥ 3 seconds".into(),
            ));
        }
        if self.loop_wait + 2 * self.retry_timeout > self.ttl {
            return Err(bad(format!(
                "loop_wait ({}) + 2 × retry_timeout ({}) must not exceed ttl ({}): a leader could lose its lock while still retrying",
                self.loop_wait, self.retry_timeout, self.ttl
            )));
        }
        Ok(())
    }
}

/// One PostgreSQL node: its host's address and its ports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    /// The host (spec name) it runs on; `None` on the one-host cluster.
    #[serde(default)]
    pub host: Option<String>,
    /// The address it listens on and is reached at.
    pub address: String,
    pub pg_port: u16,
    pub api_port: u16,
    /// Where its host keeps the bundle (the node's data is `<dir>/<name>/pgdata`), for the
    /// repository host's pgBackRest; `None`: this directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// The host holding the backup repositories (its `pgbackrest server` on `port`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RepositoryHost {
    pub host: String,
    pub address: String,
    pub port: u16,
    /// Where the repository host keeps its bundle; `None`: this directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// One etcd member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EtcdMember {
    pub name: String,
    #[serde(default)]
    pub host: Option<String>,
    pub address: String,
    pub client_port: u16,
    pub peer_port: u16,
}

impl EtcdMember {
    fn client_url(&self) -> String {
        format!("https://{}:{}", url_host(&self.address), self.client_port)
    }
    fn peer_url(&self) -> String {
        format!("https://{}:{}", url_host(&self.address), self.peer_port)
    }
}

/// The last `lines` of the log at `path` under a header naming it, for wait errors.
fn log_section(path: &Path, lines: usize) -> String {
    format!(
        "\n--- {} ---\n{}",
        path.display(),
        process::log_tail(path, lines)
    )
}

/// The one-address network of `address` (CIDR), for `pg_hba.conf`.
fn host_network(address: &str) -> String {
    if address.contains(':') {
        format!("{address}/128")
    } else {
        format!("{address}/32")
    }
}

/// An address as the host part of a URL (IPv6 in brackets).
fn url_host(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ClusterFile {
    pub(crate) etcd: Vec<EtcdMember>,
    pub(crate) nodes: Vec<NodeSpec>,
    /// The hosts whose pieces this directory runs; `None`: every piece (the one-host cluster).
    #[serde(default)]
    pub(crate) runs: Option<Vec<String>>,
    /// Networks (CIDR) besides loopback and the cluster's hosts whose clients may connect.
    #[serde(default)]
    pub(crate) clients: Vec<String>,
    /// The repository host, when the backups live on a host of their own.
    #[serde(default)]
    pub(crate) repository: Option<RepositoryHost>,
    pub(crate) ttl: u32,
    pub(crate) loop_wait: u32,
    pub(crate) retry_timeout: u32,
    pub(crate) synchronous_mode_strict: bool,
    #[serde(default)]
    pub(crate) archive: bool,
}

impl ClusterFile {
    /// Whether this directory runs the pieces of `host`.
    fn runs(&self, host: &Option<String>) -> bool {
        match (&self.runs, host) {
            (None, _) => true,
            (Some(r), Some(h)) => r.contains(h),
            (Some(_), None) => false,
        }
    }
    pub(crate) fn path(root: &Path) -> PathBuf {
        root.join("cluster.json")
    }
    pub(crate) fn write(&self, root: &Path) -> Result<(), OpsError> {
        std::fs::write(
            Self::path(root),
            serde_json::to_string_pretty(self).expect("state serializes"),
        )
        .map_err(OpsError::io("write cluster.json"))
    }
}

/// One member as Patroni reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `leader`, `sync_standby` (Patroni's synchronous mode, which dalp configures),
    /// `quorum_standby` (quorum commit, should an operator switch to it) or `replica`.
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, …
    pub state: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub timeline: Option<u64>,
    /// Replay lag behind the leader in bytes (`None` for the leader, or when unknown).
    #[serde(default, deserialize_with = "lag_bytes")]
    pub lag: Option<u64>,
}

fn lag_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    // Patroni reports a number, or "unknown" when it cannot tell.
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_u64(),
        _ => None,
    })
}

/// The cluster as the members see it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub scope: String,
    pub members: Vec<Member>,
    /// Nodes of the cluster Patroni does not list (stopped or never started).
    pub missing: Vec<String>,
}

impl ClusterStatus {
    pub fn leader(&self) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.role == "leader" && m.state == "running")
    }
    /// A replica whose acknowledgement counts for commits: the sync standby (the mode dalp
    /// configures) or, in a cluster someone switched to quorum commit, a quorum standby.
    pub fn sync_standby(&self) -> Option<&Member> {
        self.sync_standbys().next()
    }
    /// Every replica whose acknowledgement counts for commits.
    pub fn sync_standbys(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(|m| m.role == "quorum_standby" || m.role == "sync_standby")
    }
    /// A leader, every other of `nodes` streaming, and a synchronous standby when there are
    /// replicas at all.
    pub fn is_healthy(&self, nodes: usize) -> bool {
        self.leader().is_some()
            && self.healthy_replicas() == nodes - 1
            && (nodes == 1 || self.sync_standby().is_some())
    }
    /// Replicas that stream from the leader (state `running` or `streaming`).
    pub fn healthy_replicas(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.role != "leader" && (m.state == "running" || m.state == "streaming"))
            .count()
    }
}

/// How one node archives WAL and fetches it back (pgBackRest, with its own data directory).
struct NodeArchiving {
    archive_command: String,
    restore_command: String,
    /// The policy's RPO: the server's `archive_timeout`.
    timeout_secs: u32,
}

/// What one node says for itself, asked directly (works while etcd is down).
#[derive(Debug, Clone, Serialize)]
pub struct NodeProbe {
    pub name: String,
    /// Patroni's own view (`GET /patroni`): role and state; `None` when it does not answer.
    pub patroni: Option<(String, String)>,
    /// Whether PostgreSQL takes a new connection within the probe's deadline, and whether it
    /// then runs as a primary (`Ok(true)`) or a replica (`Ok(false)`).
    pub postgres: Result<bool, String>,
}

/// The cluster as Patroni reports it, checked against what each node and etcd say directly.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    /// Patroni's view (`GET /cluster` of the first node that answers), when one answers.
    pub status: Option<ClusterStatus>,
    pub nodes: Vec<NodeProbe>,
    /// Whether a majority of the etcd members answers (the DCS works).
    pub etcd_up: bool,
    /// Each etcd member and whether it answers its health check.
    pub etcd_members: Vec<(String, bool)>,
    /// Everything that is wrong, each in a sentence; empty when healthy.
    pub problems: Vec<String>,
}

/// The suffix of a node's guard among the process names (`db1.guard`).
const GUARD: &str = ".guard";

fn guard_name(node: &str) -> String {
    format!("{node}{GUARD}")
}

/// Runs `write` (which writes the file at `path`) and says whether it changed a file that
/// existed before (a new file is not a change to react to).
fn rewrote<E>(path: &Path, write: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
    let before = std::fs::read(path).ok();
    write()?;
    Ok(before.is_some_and(|b| std::fs::read(path).ok() != Some(b)))
}

/// The guard's view of the node's role: over `held` (a superuser connection on the local
/// socket, opened again when it broke; it keeps working while the postmaster is frozen),
/// `Some(true)` for a primary; `None` when it cannot tell within `timeout`.
async fn guard_role(
    held: &mut Option<tokio_postgres::Client>,
    opts: &ConnectOptions,
    running: bool,
    timeout: Duration,
) -> Option<bool> {
    if !running {
        *held = None;
        return None;
    }
    if held.as_ref().is_some_and(|c| c.is_closed()) {
        *held = None;
    }
    if held.is_none() {
        *held = Some(
            tokio::time::timeout(timeout, opts.connect())
                .await
                .ok()?
                .ok()?,
        );
    }
    let c = held.as_ref()?;
    match tokio::time::timeout(timeout, c.query_one("SELECT pg_is_in_recovery()", &[])).await {
        Ok(Ok(row)) => Some(!row.get::<_, bool>(0)),
        _ => {
            *held = None;
            None
        }
    }
}

/// A local HA cluster's directory, its processes and its settings.
pub struct HaCluster {
    root: PathBuf,
    user: ServerUser,
    secrets: Secrets,
    state: ClusterFile,
    bin: PathBuf,
    children: Mutex<HashMap<String, Child>>,
    stop_on_drop: bool,
    http: std::sync::OnceLock<reqwest::Client>,
}

fn err(context: impl Into<String>, message: impl std::fmt::Display) -> OpsError {
    OpsError::Bootstrap {
        context: context.into(),
        message: message.to_string(),
    }
}

/// An HTTPS client for etcd and Patroni's REST API: trusts only the cluster's CA and
/// presents the directory's host certificate (when readable) as its client identity.
fn tls_client(tls: &Path) -> Result<reqwest::Client, OpsError> {
    let ca = std::fs::read(tls.join(pki::CA_CERT)).map_err(OpsError::io(format!(
        "read {}",
        tls.join(pki::CA_CERT).display()
    )))?;
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).map_err(|e| err("CA", e))?)
        .timeout(Duration::from_secs(5))
        .no_proxy();
    if let (Ok(mut cert), Ok(key)) = (
        std::fs::read(tls.join(pki::SERVER_CERT)),
        std::fs::read(tls.join(pki::SERVER_KEY)),
    ) {
        cert.extend_from_slice(&key);
        b = b.identity(reqwest::Identity::from_pem(&cert).map_err(|e| err("host certificate", e))?);
    }
    b.build().map_err(|e| err("HTTPS client", e))
}

impl HaCluster {
    fn node_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn state_path(root: &Path) -> PathBuf {
        ClusterFile::path(root)
    }
    fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    fn http(&self) -> reqwest::Client {
        self.http
            .get_or_init(|| {
                tls_client(&self.tls_dir()).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "no TLS client for the cluster; requests will fail");
                    reqwest::Client::new()
                })
            })
            .clone()
    }
    /// The etcd members this directory runs.
    fn local_etcd(&self) -> impl Iterator<Item = &EtcdMember> {
        self.state.etcd.iter().filter(|m| self.state.runs(&m.host))
    }
    /// The nodes this directory runs.
    fn local_nodes(&self) -> impl Iterator<Item = &NodeSpec> {
        self.state.nodes.iter().filter(|n| self.state.runs(&n.host))
    }
    fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.state.nodes.iter().find(|n| n.name == name)
    }
    fn api_url(&self, n: &NodeSpec, path: &str) -> String {
        format!("https://{}:{}{path}", url_host(&n.address), n.api_port)
    }
    /// For a cluster spread over hosts (made by `dalp cluster init`): every host, in the
    /// order an orderly `node down` takes them — the replicas' hosts, then `leader`'s, then
    /// the hosts with no PostgreSQL (etcd only, the repository). `None` for the one-host
    /// cluster, which this directory runs whole.
    pub fn shutdown_order(&self, leader: Option<&str>) -> Option<Vec<String>> {
        self.state.runs.as_ref()?;
        let host_of = |n: &NodeSpec| n.host.clone().unwrap_or_else(|| n.name.clone());
        let mut order: Vec<String> = self
            .state
            .nodes
            .iter()
            .filter(|n| Some(n.name.as_str()) != leader)
            .map(host_of)
            .collect();
        order.extend(
            self.state
                .nodes
                .iter()
                .filter(|n| Some(n.name.as_str()) == leader)
                .map(host_of),
        );
        let others = self
            .state
            .etcd
            .iter()
            .filter_map(|m| m.host.clone())
            .chain(self.state.repository.iter().map(|r| r.host.clone()));
        for h in others {
            if !order.contains(&h) {
                order.push(h);
            }
        }
        Some(order)
    }
    /// The etcd members.
    pub fn etcd_members(&self) -> &[EtcdMember] {
        &self.state.etcd
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls").join(pki::CA_CERT)
    }
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }
    /// Whether this is a cluster spread over hosts (made by `dalp cluster init`), not the
    /// one-host cluster of `dalp cluster up`.
    pub fn spans_hosts(&self) -> bool {
        self.state.runs.is_some()
    }
    /// The names of the nodes this directory runs.
    pub fn local_node_names(&self) -> Vec<String> {
        self.local_nodes().map(|n| n.name.clone()).collect()
    }
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.state.nodes
    }
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.state.ttl.into())
    }
    /// Stop every process when this value is dropped (tests); `dalp cluster up` leaves them.
    pub fn stop_on_drop(mut self, yes: bool) -> Self {
        self.stop_on_drop = yes;
        self
    }

    /// Whether `dir` holds a local HA cluster (made by `dalp cluster up`) rather than an
    /// embedded instance.
    pub fn is_cluster_dir(dir: &Path) -> bool {
        Self::state_path(dir).exists()
    }

    /// Opens an existing cluster directory (for status, switchover, down).
    pub fn open(dir: &Path) -> Result<HaCluster, OpsError> {
        Self::open_dir(dir, true)
    }

    /// Opens a cluster directory without its secrets (root's alone): what a node's guard,
    /// running as the server user, needs — the topology, the TLS material and the pids.
    pub fn open_as_guard(dir: &Path) -> Result<HaCluster, OpsError> {
        Self::open_dir(dir, false)
    }

    fn open_dir(dir: &Path, with_secrets: bool) -> Result<HaCluster, OpsError> {
        let root = std::fs::canonicalize(dir).map_err(|e| {
            err(
                format!("cluster directory {}", dir.display()),
                format!(
                    "{e}; create one with `dalp cluster up --dir {}`",
                    dir.display()
                ),
            )
        })?;
        let text = std::fs::read_to_string(Self::state_path(&root)).map_err(|e| {
            err(
                format!("{}", Self::state_path(&root).display()),
                format!("{e}: not an HA cluster directory (`dalp cluster up` makes one)"),
            )
        })?;
        let state: ClusterFile = serde_json::from_str(&text).map_err(|e| {
            err(
                "cluster.json",
                format!(
                    "{e} (a directory made by an older dalp: recreate it with `dalp cluster up`)"
                ),
            )
        })?;
        let secrets = if with_secrets {
            Secrets::load(&root.join("secrets.json")).map_err(|e| err("secrets", e))?
        } else {
            Secrets::default()
        };
        Ok(HaCluster {
            root,
            user: ServerUser::resolve()?,
            secrets,
            state,
            bin: pg_bin(None),
            children: Mutex::new(HashMap::new()),
            stop_on_drop: false,
            http: Default::default(),
        })
    }

    /// Creates (first time) or restarts the cluster in `dir` and waits until it has a
    /// leader, every replica streams, and (with more than one node) a synchronous standby.
    /// dalp's roles and database are created once, through the leader.
    pub async fn up(dir: &Path, opts: HaOptions) -> Result<HaCluster, OpsError> {
        opts.validate()?;
        check_binaries()?;
        let bin = pg_bin(opts.bin_dir.clone());
        let user = ServerUser::resolve()?;
        let root = prepare_dir(dir, &user)?;
        let state = match std::fs::read_to_string(Self::state_path(&root)) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                err(
                    "cluster.json",
                    format!("{e} (a directory made by an older dalp: remove it, or choose another --dir)"),
                )
            })?,
            Err(_) => ClusterFile {
                etcd: vec![EtcdMember {
                    name: "etcd".into(),
                    host: None,
                    address: LOOPBACK.into(),
                    client_port: free_port()?,
                    peer_port: free_port()?,
                }],
                nodes: (1..=opts.nodes)
                    .map(|i| -> Result<NodeSpec, OpsError> {
                        Ok(NodeSpec {
                            name: format!("node{i}"),
                            host: None,
                            address: LOOPBACK.into(),
                            pg_port: free_port()?,
                            api_port: free_port()?,
                            dir: None,
                        })
                    })
                    .collect::<Result<_, _>>()?,
                runs: None,
                clients: Vec::new(),
                repository: None,
                ttl: opts.ttl,
                loop_wait: opts.loop_wait,
                retry_timeout: opts.retry_timeout,
                synchronous_mode_strict: opts.synchronous_mode_strict,
                archive: opts.archive,
            },
        };
        let secrets_path = root.join("secrets.json");
        let mut secrets = if secrets_path.exists() {
            Secrets::load(&secrets_path).map_err(|e| err("secrets", e))?
        } else {
            roles::generate_secrets()
        };
        complete_secrets(&mut secrets);
        pki::write_private(
            &secrets_path,
            &serde_json::to_string_pretty(&secrets).expect("secrets serialize"),
        )?;
        let tls = root.join("tls");
        pki::ensure(&tls, &user)?;
        if !tls.join(pki::CRL).exists() {
            pki::write_crl(&tls)?;
        }
        std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o755))
            .map_err(OpsError::io("chmod tls dir"))?;

        let cluster = HaCluster {
            root,
            user,
            secrets,
            state,
            bin,
            children: Mutex::new(HashMap::new()),
            stop_on_drop: false,
            http: Default::default(),
        };
        if let Some(name) = cluster.running_processes().first() {
            return Err(err(
                format!("cluster in {}", cluster.root.display()),
                format!("{name} is already running; see `dalp cluster status`, or stop it with `dalp cluster down`"),
            ));
        }
        cluster.state.write(&cluster.root)?;
        cluster.start_local(&opts).await
    }

    /// Starts what this host runs of a cluster made by `dalp cluster init` (its bundle
    /// directory): its etcd member(s), waiting for etcd's quorum (the other hosts start
    /// theirs meanwhile), then its node's Patroni, waiting until that node runs. Pieces that
    /// already run are left alone, so it also restarts one stopped piece. The host whose node
    /// leads creates dalp's roles and database.
    pub async fn node_up(bundle: &Path) -> Result<HaCluster, OpsError> {
        check_binaries()?;
        let mut cluster = HaCluster::open(bundle)?;
        if cluster.state.runs.as_ref().is_none_or(|r| r.is_empty()) {
            return Err(err(
                format!("bundle {}", bundle.display()),
                "this directory runs no host (it is the operator's copy made by `dalp cluster init`); use one of its hosts/<name> bundles",
            ));
        }
        let root = prepare_dir(&cluster.root, &cluster.user)?;
        cluster.root = root;
        // A bundle copied to its host: the key must belong to the server user again.
        let key = cluster.tls_dir().join(pki::SERVER_KEY);
        cluster.user.chown(&key)?;
        std::fs::set_permissions(cluster.tls_dir(), std::fs::Permissions::from_mode(0o755))
            .map_err(OpsError::io("chmod tls dir"))?;
        cluster.start_local(&HaOptions::default()).await
    }

    /// Starts every piece this directory runs that is not running, waits until they serve
    /// (the whole cluster healthy when the directory runs all of it), and has the leader's
    /// host create dalp's roles and database.
    async fn start_local(self, opts: &HaOptions) -> Result<HaCluster, OpsError> {
        // From here on, a failure stops whatever was started.
        let cluster = self.stop_on_drop(true);
        for m in cluster.local_etcd().cloned().collect::<Vec<_>>() {
            cluster.start_etcd(&m).await?;
        }
        cluster.wait_etcd(Duration::from_secs(90)).await?;
        let backups = cluster.backups()?;
        if let Some(b) = &backups {
            // A running server re-reads its configuration only when started: the topology
            // changed (`dalp cluster add-host` / `remove-host`), so restart it.
            if rewrote(&b.config_path(), || b.write_config())?
                && cluster.live_pid(BACKUP_SERVER).is_some()
            {
                tracing::warn!("the cluster's hosts changed: restarting the pgbackrest server");
                cluster.stop_daemon(BACKUP_SERVER);
            }
            cluster.start_backup_server(b)?;
        }
        let local: Vec<NodeSpec> = cluster.local_nodes().cloned().collect();
        for node in &local {
            let pgdata = cluster.node_dir(&node.name).join("pgdata");
            let archiving = backups.as_ref().map(|b| NodeArchiving {
                archive_command: b.archive_command_for(&pgdata),
                restore_command: b.restore_command_for(&pgdata),
                timeout_secs: b.policy().rpo_secs,
            });
            let yml = cluster.node_dir(&node.name).join("patroni.yml");
            // A running Patroni reloads its configuration on SIGHUP (and with it
            // PostgreSQL's pg_hba.conf): the topology changed.
            if rewrote(&yml, || {
                cluster.write_node_config(node, opts, archiving.as_ref())
            })? {
                if let Some(pid) = cluster.live_pid(&node.name) {
                    tracing::warn!(node = %node.name, "the cluster's hosts changed: Patroni reloads its configuration");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
                }
            }
        }
        // A new cluster: the first node bootstraps and the others join once it leads, so
        // they clone from it instead of racing to initdb. A restart: all at once, since in
        // synchronous mode only the former leader or its synchronous standby may lead.
        let restart = local
            .iter()
            .any(|n| cluster.node_dir(&n.name).join("pgdata/PG_VERSION").exists());
        if let Some((first, rest)) = local.split_first() {
            cluster.start_node(&first.name)?;
            if !restart && !rest.is_empty() {
                cluster
                    .wait_for(Duration::from_secs(120), "a leader", |s| {
                        s.leader().is_some()
                    })
                    .await?;
            }
            for node in rest {
                cluster.start_node(&node.name)?;
            }
        }
        if cluster.state.runs.is_none() {
            cluster.wait_healthy(Duration::from_secs(180)).await?;
        } else {
            cluster.wait_local_running(Duration::from_secs(180)).await?;
        }
        let leader = cluster.leader().await?;
        if local.iter().any(|n| n.name == leader) && cluster.wait_writable(&leader).await {
            bootstrap_roles_and_database(
                &|db| cluster.superuser_options(&leader, db),
                &cluster.secrets,
            )
            .await?;
            if let Some(b) = backups.as_ref().filter(|b| b.holds_repositories()) {
                b.stanza_create()?;
            }
        }
        // The repository host creates the stanza once the leader's host serves its data
        // directory (retried: that host may still be starting its server). A restart, or a
        // re-read after `cluster add-host` (the new node not started yet), finds it made.
        if let Some(b) = backups
            .as_ref()
            .filter(|b| b.site().is_some() && b.holds_repositories() && !b.stanza_exists())
        {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                match b.stanza_create() {
                    Ok(()) => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::info!(error = %e, "stanza-create: the leader's host is not serving yet; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(cluster.stop_on_drop(false))
    }

    /// Waits until every node this directory runs says (its own REST API) that its
    /// PostgreSQL runs, as primary or streaming replica, and a leader exists.
    async fn wait_local_running(&self, timeout: Duration) -> Result<(), OpsError> {
        let deadline = Instant::now() + timeout;
        let local: Vec<NodeSpec> = self.local_nodes().cloned().collect();
        loop {
            let mut waiting = Vec::new();
            for n in &local {
                let state = self.patroni_self(n).await.map(|(_, s)| s);
                if !matches!(state.as_deref(), Some("running" | "streaming")) {
                    waiting.push(format!(
                        "{} ({})",
                        n.name,
                        state.unwrap_or("no answer".into())
                    ));
                }
            }
            let led = self.leader().await.is_ok();
            if waiting.is_empty() && led {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = local
                    .iter()
                    .map(|n| log_section(&self.node_dir(&n.name).join("patroni.log"), 15))
                    .collect();
                return Err(err(
                    format!("waiting for this host's nodes to run ({timeout:?})"),
                    format!(
                        "not running: {}{}{logs}",
                        waiting.join(", "),
                        if led { "" } else { "; no leader" }
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits (up to a minute) until node `name`'s PostgreSQL takes writes: Patroni names a
    /// node leader while its promotion may still be finishing. False when it does not.
    async fn wait_writable(&self, name: &str) -> bool {
        let opts = self.superuser_options(name, "postgres");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = opts.connect().await {
                if let Ok(r) = c.query_one("SELECT NOT pg_is_in_recovery()", &[]).await {
                    if r.get::<_, bool>(0) {
                        return true;
                    }
                }
            }
            if Instant::now() > deadline {
                tracing::warn!(node = name, "the leader is still in recovery; roles and database are left to the next start");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether node `name`'s Patroni answers its REST API (within 3 s).
    pub async fn member_answers(&self, name: &str) -> bool {
        match self.node(name) {
            Some(n) => self.patroni_self(n).await.is_some(),
            None => false,
        }
    }

    /// A node's own view (`GET /patroni`): its role and state, `None` when it does not answer.
    async fn patroni_self(&self, n: &NodeSpec) -> Option<(String, String)> {
        let r: Value = self
            .http()
            .get(self.api_url(n, "/patroni"))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some((
            r["role"].as_str().unwrap_or("").to_string(),
            r["state"].as_str().unwrap_or("").to_string(),
        ))
    }

    fn is_etcd(&self, process: &str) -> bool {
        self.state.etcd.iter().any(|m| m.name == process)
    }

    fn pid_file(&self, process: &str) -> PathBuf {
        if let Some(node) = process.strip_suffix(GUARD) {
            self.node_dir(node).join("guard.pid")
        } else if self.is_etcd(process) || process == BACKUP_SERVER {
            self.root.join(format!("{process}.pid"))
        } else {
            self.node_dir(process).join("patroni.pid")
        }
    }

    /// The pid of `process` (`etcd` or a node name) when it is alive.
    fn live_pid(&self, process: &str) -> Option<i32> {
        {
            let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = children.get_mut(process) {
                if c.try_wait().ok().flatten().is_none() {
                    return Some(c.id() as i32);
                }
                // Ours exited (reaped now); another dalp may have started it again since,
                // so the pid file decides.
                children.remove(process);
            }
        }
        let pid: i32 = std::fs::read_to_string(self.pid_file(process))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let ours = if process.ends_with(GUARD) {
            cmdline.contains("guard")
        } else if process == BACKUP_SERVER {
            cmdline.contains("pgbackrest")
        } else if self.is_etcd(process) {
            cmdline.contains("etcd")
        } else {
            cmdline.contains("patroni")
        };
        (ours && process::alive(pid)).then_some(pid)
    }

    /// The pid of node `name`'s Patroni, when it runs (tests stall it with SIGSTOP).
    pub fn patroni_pid(&self, name: &str) -> Option<i32> {
        self.live_pid(name)
    }

    /// The pid of the first etcd member this directory runs, when it runs.
    pub fn etcd_pid(&self) -> Option<i32> {
        let m = self.local_etcd().next()?;
        self.live_pid(&m.name)
    }

    /// The pid of etcd member `name`, when it runs (from this directory).
    pub fn etcd_member_pid(&self, name: &str) -> Option<i32> {
        self.live_pid(name)
    }

    /// Starts every piece that is not running — etcd, then each node's Patroni (which starts
    /// or recovers its PostgreSQL) — leaving running ones alone; returns what it started.
    /// The caller waits for health (`wait_for`).
    pub async fn start_missing(&self) -> Result<Vec<String>, OpsError> {
        let mut started = Vec::new();
        for m in self.local_etcd().cloned().collect::<Vec<_>>() {
            if self.live_pid(&m.name).is_none() {
                self.start_etcd(&m).await?;
                started.push(m.name.clone());
            }
        }
        if !started.is_empty() {
            self.wait_etcd(Duration::from_secs(60)).await?;
        }
        for n in self.local_nodes().cloned().collect::<Vec<_>>() {
            if self.live_pid(&n.name).is_none() {
                self.start_node(&n.name)?;
                started.push(format!("patroni {}", n.name));
            } else if self.start_guard(&n.name)? {
                started.push(format!("guard {}", n.name));
            }
        }
        Ok(started)
    }

    /// Starts etcd again (after it stopped or was killed); with `wipe`, its data directory is
    /// emptied first, as when the member's disk is lost. Patroni re-creates its keys.
    pub async fn restart_etcd(&self, wipe: bool) -> Result<(), OpsError> {
        for m in self.local_etcd().cloned().collect::<Vec<_>>() {
            if self.live_pid(&m.name).is_some() {
                continue;
            }
            if wipe {
                let data = self.root.join(&m.name);
                std::fs::remove_dir_all(&data)
                    .map_err(OpsError::io(format!("remove {}", data.display())))?;
            }
            self.start_etcd(&m).await?;
        }
        self.wait_etcd(Duration::from_secs(30)).await
    }

    /// The postmaster of node `name`, when it runs.
    pub fn postmaster_pid(&self, name: &str) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.node_dir(name).join("pgdata/postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (process::alive(pid) && comm.trim() == "postgres").then_some(pid)
    }

    /// Names of the processes of this cluster that are running.
    pub fn running_processes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .local_nodes()
            .flat_map(|n| {
                let mut v = Vec::new();
                if self.live_pid(&n.name).is_some() {
                    v.push(format!("patroni {}", n.name));
                }
                if self.postmaster_pid(&n.name).is_some() {
                    v.push(format!("postgres {}", n.name));
                }
                if self.live_pid(&guard_name(&n.name)).is_some() {
                    v.push(format!("guard {}", n.name));
                }
                v
            })
            .collect();
        for m in self.local_etcd() {
            if self.live_pid(&m.name).is_some() {
                names.push(m.name.clone());
            }
        }
        if self.live_pid(BACKUP_SERVER).is_some() {
            names.push(BACKUP_SERVER.into());
        }
        names
    }

    fn spawn_daemon(&self, name: &str, mut cmd: Command, log: &Path) -> Result<(), OpsError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(OpsError::io(format!("open {}", log.display())))?;
        // The server user's: its guard reopens it when it restarts Patroni.
        self.user.chown(log)?;
        let err_file = file.try_clone().map_err(OpsError::io("open log"))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err_file);
        self.user.configure_daemon(&mut cmd);
        let child = process::spawn(cmd).map_err(OpsError::io(format!("start {name}")))?;
        // Replaced, not rewritten: the guard restarting Patroni as the server user may not
        // write a pid file root made (the directory is the server user's).
        let pid_file = self.pid_file(name);
        let _ = std::fs::remove_file(&pid_file);
        std::fs::write(&pid_file, child.id().to_string())
            .map_err(OpsError::io("write pid file"))?;
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), child);
        Ok(())
    }

    /// Starts etcd member `m`; when its disk was lost, it first rejoins the running etcd
    /// cluster as a new member ([`HaCluster::rejoin_etcd`]).
    async fn start_etcd(&self, m: &EtcdMember) -> Result<(), OpsError> {
        if self.live_pid(&m.name).is_some() {
            return Ok(());
        }
        let existing = self.rejoin_etcd(m).await?;
        self.start_etcd_member(m, existing)
    }

    /// A member whose data directory holds no etcd data starts as one of a new cluster
    /// (the first start, or every member at once) — unless another member answers and
    /// lists it as having run before (it published its client URLs): its disk was lost, and
    /// starting it as new would make it a member with an empty log that the others reject.
    /// Then it is removed from the cluster and added again (etcd's member API, with this
    /// host's client certificate), and starts with `--initial-cluster-state existing` and
    /// the members the cluster now has, which this returns. Needs a majority of the other
    /// members.
    async fn rejoin_etcd(&self, m: &EtcdMember) -> Result<Option<Vec<String>>, OpsError> {
        if self.state.etcd.len() < 2 || self.root.join(&m.name).join("member").exists() {
            return Ok(None);
        }
        let fail = |e: String| err(format!("etcd member {} rejoining", m.name), e);
        let peer_url = m.peer_url();
        let has_ours = |x: &Value| {
            x["peerURLs"]
                .as_array()
                .is_some_and(|u| u.iter().any(|u| u.as_str() == Some(peer_url.as_str())))
        };
        for other in self.state.etcd.iter().filter(|o| o.name != m.name) {
            // A linearizable read: answers only where a majority runs.
            let Ok(list) = self
                .etcd_api(other, "/v3/cluster/member/list", json!({}))
                .await
            else {
                continue;
            };
            let members = list["members"].as_array().cloned().unwrap_or_default();
            let started = |x: &Value| x["clientURLs"].as_array().is_some_and(|u| !u.is_empty());
            match members.iter().find(|x| has_ours(x)) {
                // Listed but never started (the first start, the others' quorum formed
                // before this member came up): it joins as the initial cluster lists it.
                Some(x) if !started(x) && x["name"].as_str().is_some_and(|n| !n.is_empty()) => {
                    return Ok(None)
                }
                // Added by an earlier rejoin that did not get to start it (etcd names a
                // member only once it runs): it starts into the cluster as it is now.
                Some(x) if !started(x) => return Ok(Some(self.initial_cluster(&list["members"]))),
                Some(x) => {
                    tracing::warn!(member = %m.name, "etcd member has no data but the cluster knows it: its disk was lost; removing and adding it again");
                    self.etcd_reconfigure(
                        other,
                        "/v3/cluster/member/remove",
                        json!({"ID": x["ID"]}),
                    )
                    .await
                    .map_err(fail)?;
                }
                None => {}
            }
            let added = self
                .etcd_reconfigure(
                    other,
                    "/v3/cluster/member/add",
                    json!({"peerURLs": [peer_url]}),
                )
                .await
                .map_err(fail)?;
            return Ok(Some(self.initial_cluster(&added["members"])));
        }
        Ok(None)
    }

    /// `--initial-cluster` for a member joining a running cluster whose members etcd listed
    /// as `members`, with the names the spec gives them (one added but not yet run has none).
    fn initial_cluster(&self, members: &Value) -> Vec<String> {
        let mut initial = Vec::new();
        for x in members.as_array().into_iter().flatten() {
            let urls: Vec<&str> = x["peerURLs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str())
                .collect();
            let name = self
                .state
                .etcd
                .iter()
                .find(|s| urls.contains(&s.peer_url().as_str()))
                .map(|s| s.name.clone())
                .unwrap_or_else(|| x["name"].as_str().unwrap_or("").to_string());
            initial.extend(urls.iter().map(|u| format!("{name}={u}")));
        }
        initial
    }

    /// A membership change through `at`, retried for up to 30 s while etcd refuses it as
    /// "unhealthy cluster" (its peers must have been connected for a few seconds, e.g. just
    /// after a removal or a restart).
    async fn etcd_reconfigure(
        &self,
        at: &EtcdMember,
        path: &str,
        body: Value,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.etcd_api(at, path, body.clone()).await {
                Err(e) if e.contains("unhealthy cluster") && Instant::now() < deadline => {
                    tracing::info!(error = %e, "etcd refuses the membership change for now; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                r => return r,
            }
        }
    }

    /// POSTs `body` to etcd member `at`'s JSON gateway (`path` under `/v3/`).
    async fn etcd_api(&self, at: &EtcdMember, path: &str, body: Value) -> Result<Value, String> {
        let call = async {
            let r = self
                .http()
                .post(format!("{}{path}", at.client_url()))
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let code = r.status();
            let v: Value = r.json().await.map_err(|e| e.to_string())?;
            if !code.is_success() {
                return Err(format!("{code} {v}"));
            }
            Ok(v)
        };
        call.await.map_err(|e| format!("{} {path}: {e}", at.name))
    }

    /// Starts etcd member `m` (TLS for clients and peers, a client certificate from the
    /// cluster's CA required of both): as one of a new cluster, or with `existing` (the
    /// members of the cluster it rejoins) as a new member of a running one. Does not wait: a
    /// member of several serves only once a majority runs ([`HaCluster::wait_etcd`]). The
    /// caller ([`HaCluster::start_etcd`]) has checked that it is not running.
    fn start_etcd_member(
        &self,
        m: &EtcdMember,
        existing: Option<Vec<String>>,
    ) -> Result<(), OpsError> {
        let data = self.root.join(&m.name);
        std::fs::create_dir_all(&data).map_err(OpsError::io("create etcd dir"))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(OpsError::io("chmod etcd dir"))?;
        self.user.chown(&data)?;
        let tls = self.tls_dir();
        let (cert, key, ca) = (
            tls.join(pki::SERVER_CERT),
            tls.join(pki::SERVER_KEY),
            tls.join(pki::CA_CERT),
        );
        let state = if existing.is_some() {
            "existing"
        } else {
            "new"
        };
        let initial: Vec<String> = existing.unwrap_or_else(|| {
            self.state
                .etcd
                .iter()
                .map(|p| format!("{}={}", p.name, p.peer_url()))
                .collect()
        });
        let mut cmd = Command::new(ETCD_BIN);
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", SCOPE])
            .args(["--initial-cluster-state", state])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--client-cert-auth")
            .arg("--peer-cert-file")
            .arg(&cert)
            .arg("--peer-key-file")
            .arg(&key)
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .arg("--peer-client-cert-auth")
            .args(["--listen-metrics-urls", ""])
            .current_dir(&self.root)
            .env("ETCD_UNSUPPORTED_ARCH", "");
        self.spawn_daemon(&m.name, cmd, &self.root.join(format!("{}.log", m.name)))
    }

    /// Whether etcd member `m` answers its health check (it has a leader: a majority runs).
    async fn etcd_healthy(&self, m: &EtcdMember, within: Duration) -> bool {
        match self
            .http()
            .get(format!("{}/health", m.client_url()))
            .timeout(within)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                r.json::<Value>().await.is_ok_and(|v| v["health"] == "true")
            }
            _ => false,
        }
    }

    /// Waits until an etcd member this directory runs (any member, when it runs none) is
    /// healthy: a majority of the members is up and has a leader.
    pub async fn wait_etcd(&self, timeout: Duration) -> Result<(), OpsError> {
        let members: Vec<EtcdMember> = if self.local_etcd().next().is_some() {
            self.local_etcd().cloned().collect()
        } else {
            self.state.etcd.clone()
        };
        let deadline = Instant::now() + timeout;
        loop {
            for m in &members {
                if self.etcd_healthy(m, Duration::from_secs(2)).await {
                    return Ok(());
                }
            }
            let died = members
                .iter()
                .filter(|m| self.state.runs(&m.host) && self.live_pid(&m.name).is_none())
                .map(|m| m.name.clone())
                .collect::<Vec<_>>();
            if !died.is_empty() || Instant::now() > deadline {
                let logs: String = members
                    .iter()
                    .filter(|m| self.state.runs(&m.host))
                    .map(|m| log_section(&self.root.join(format!("{}.log", m.name)), 10))
                    .collect();
                return Err(err(
                    if died.is_empty() {
                        format!("etcd has no healthy member after {timeout:?} (a majority of its members must run)")
                    } else {
                        format!("etcd member {} exited", died.join(", "))
                    },
                    format!("see the logs{logs}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// pgBackRest for this cluster (every node a target; it backs up the primary), when
    /// the cluster archives.
    pub fn backups(&self) -> Result<Option<crate::backup::Backups>, OpsError> {
        if !self.state.archive {
            return Ok(None);
        }
        use crate::backup::{Backups, PgTarget, TlsSite};
        let policy = crate::backup::Policy::load(&self.root.join("backup.toml"))?;
        let dir = self.root.join("backup");
        let Some(repo) = &self.state.repository else {
            // Every node on this host: one local repository, every data directory a target.
            let targets = self
                .state
                .nodes
                .iter()
                .map(|n| PgTarget {
                    data_dir: self.node_dir(&n.name).join("pgdata"),
                    socket_dir: self.node_dir(&n.name).join("run"),
                    port: Some(n.pg_port),
                    host: None,
                })
                .collect();
            return Backups::new(&dir, policy, targets).map(Some);
        };
        let tls = self.tls_dir();
        let site =
            |listen: &str, clients: Vec<String>, repository: Option<(String, PathBuf)>| TlsSite {
                cert: tls.join(pki::SERVER_CERT),
                key: tls.join(pki::SERVER_KEY),
                ca: tls.join(pki::CA_CERT),
                listen: listen.to_string(),
                port: repo.port,
                clients,
                repository,
            };
        if self.state.runs(&Some(repo.host.clone())) {
            // The repository host: it backs up every node through that node's server.
            let targets = self
                .state
                .nodes
                .iter()
                .map(|n| {
                    let bundle = n.dir.clone().unwrap_or_else(|| self.root.clone());
                    let base = bundle.join(&n.name);
                    PgTarget {
                        data_dir: base.join("pgdata"),
                        socket_dir: base.join("run"),
                        port: Some(n.pg_port),
                        host: Some((
                            n.address.clone(),
                            bundle.join("backup").join("pgbackrest.conf"),
                        )),
                    }
                })
                .collect();
            let clients = self
                .state
                .nodes
                .iter()
                .map(|n| n.host.clone().unwrap_or_else(|| n.name.clone()))
                .collect();
            return Backups::new(&dir, policy, targets)
                .map(|b| Some(b.on_site(site(&repo.address, clients, None))));
        }
        let Some(n) = self.local_nodes().next() else {
            return Ok(None);
        };
        let target = PgTarget {
            data_dir: self.node_dir(&n.name).join("pgdata"),
            socket_dir: self.node_dir(&n.name).join("run"),
            port: Some(n.pg_port),
            host: None,
        };
        let s = site(
            &n.address,
            vec![repo.host.clone()],
            Some((
                repo.address.clone(),
                repo.dir
                    .clone()
                    .unwrap_or_else(|| self.root.clone())
                    .join("backup")
                    .join("pgbackrest.conf"),
            )),
        );
        Backups::new(&dir, policy, vec![target]).map(|b| Some(b.on_site(s)))
    }

    /// Starts this host's `pgbackrest server` unless it runs (multi-host clusters with a
    /// repository host only).
    fn start_backup_server(&self, b: &crate::backup::Backups) -> Result<(), OpsError> {
        if b.site().is_none() || self.live_pid(BACKUP_SERVER).is_some() {
            return Ok(());
        }
        let mut cmd = b.server_command();
        cmd.env("HOME", &self.root);
        self.spawn_daemon(
            BACKUP_SERVER,
            cmd,
            &self.root.join(format!("{BACKUP_SERVER}.log")),
        )
    }

    fn write_node_config(
        &self,
        node: &NodeSpec,
        opts: &HaOptions,
        archiving: Option<&NodeArchiving>,
    ) -> Result<(), OpsError> {
        let dir = self.node_dir(&node.name);
        let run = dir.join("run");
        let log = dir.join("log");
        for d in [&dir, &run, &log] {
            std::fs::create_dir_all(d).map_err(OpsError::io(format!("create {}", d.display())))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(OpsError::io(format!("chmod {}", d.display())))?;
            self.user.chown(d)?;
        }
        if run
            .join(format!(".s.PGSQL.{}.lock", node.pg_port))
            .as_os_str()
            .len()
            > 100
        {
            return Err(err(
                format!("cluster directory {}", self.root.display()),
                "its path is too long for a Unix socket; choose a shorter --dir",
            ));
        }
        let pgaudit = embedded::parse_pgaudit_classes(
            opts.pgaudit_log
                .as_deref()
                .unwrap_or(embedded::DEFAULT_PGAUDIT_LOG),
        )?;
        let tls = self.root.join("tls");
        let mut local = serde_json::Map::new();
        let mut cluster_wide = serde_json::Map::new();
        for (k, v) in server_settings(&ServerConf {
            bin: &self.bin,
            socket_dir: &run,
            tls_dir: &tls,
            log_dir: &log,
            pgaudit_log: &pgaudit,
            slow_ms: opts
                .slow_query_ms
                .unwrap_or(embedded::DEFAULT_SLOW_QUERY_MS),
            max_connections: embedded::DEFAULT_MAX_CONNECTIONS,
            archive_command: archiving.map(|a| a.archive_command.as_str()),
            archive_timeout_secs: archiving.map_or(60, |a| a.timeout_secs),
        }) {
            // Patroni insists these are the same everywhere (its dynamic configuration).
            if k == "max_connections" || k == "archive_mode" {
                cluster_wide.insert(k.into(), json!(v));
            } else {
                local.insert(k.into(), json!(v));
            }
        }
        for (k, v) in [
            ("wal_level", "replica"),
            ("hot_standby", "on"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("wal_keep_size", "256MB"),
            ("wal_log_hints", "on"),
            // Read-your-writes waits for replay; keep it prompt under reads.
            ("hot_standby_feedback", "on"),
            // A synchronous standby that stops answering (cut off, frozen) is dropped after
            // 15 s instead of PostgreSQL's 60, so Patroni can name another and commits go on.
            ("wal_sender_timeout", "15s"),
            ("wal_receiver_timeout", "15s"),
        ] {
            cluster_wide.insert(k.into(), json!(v));
        }
        let ca = self.ca_cert().display().to_string();
        let (cert, key) = (
            tls.join(pki::SERVER_CERT).display().to_string(),
            tls.join(pki::SERVER_KEY).display().to_string(),
        );
        let api = format!("{}:{}", url_host(&node.address), node.api_port);
        let pg = format!("{}:{}", url_host(&node.address), node.pg_port);
        // Replicas, pg_rewind and dalp's components connect from the cluster's hosts and the
        // spec's client networks (each besides loopback).
        let mut networks: Vec<String> = self
            .state
            .nodes
            .iter()
            .map(|n| host_network(&n.address))
            .chain(self.state.clients.iter().cloned())
            .collect();
        networks.sort();
        networks.dedup();
        let auth = |role: &str| {
            json!({
                "username": role,
                "password": self.secrets.roles[role],
                "sslmode": "verify-full",
                "sslrootcert": ca,
            })
        };
        let s = &self.state;
        let config = json!({
            "scope": SCOPE,
            "namespace": "/dalp/",
            "name": node.name,
            "log": {"level": "INFO"},
            // TLS; the write verbs (switchover, restart, reinitialize, …) need a client
            // certificate from the cluster's CA as well as the password.
            "restapi": {
                "listen": api,
                "connect_address": api,
                "certfile": cert,
                "keyfile": key,
                "cafile": ca,
                "verify_client": "optional",
                "authentication": {"username": API_USER, "password": self.secrets.roles[API_USER]},
            },
            // What Patroni presents to the other members' REST APIs (failsafe mode's POSTs).
            "ctl": {"certfile": cert, "keyfile": key, "cacert": ca},
            "etcd3": {
                "hosts": s.etcd.iter().map(|m| format!("{}:{}", url_host(&m.address), m.client_port)).collect::<Vec<_>>(),
                "protocol": "https",
                "cacert": ca,
                "cert": cert,
                "key": key,
            },
            "bootstrap": {
                "dcs": {
                    "ttl": s.ttl,
                    "loop_wait": s.loop_wait,
                    "retry_timeout": s.retry_timeout,
                    "maximum_lag_on_failover": 1048576,
                    // One synchronous standby, the only replica that may be promoted.
                    // Not quorum commit (`ANY 1 (every replica)`): with no watchdog, a
                    // leader whose Patroni is frozen keeps running as a primary, and under
                    // quorum commit the replica that was not promoted went on
                    // acknowledging its commits until it re-pointed to the new leader —
                    // acknowledged writes on a timeline the cluster then rewinds away (the
                    // namespace soak caught it, docs/benchmarks.md). Here the zombie's
                    // commits wait for the standby that was promoted, which never answers.
                    "synchronous_mode": true,
                    "synchronous_mode_strict": s.synchronous_mode_strict,
                    // An etcd outage does not demote a primary that every member still
                    // reaches over the REST API (Patroni ≥ 3.0): writes go on.
                    "failsafe_mode": true,
                    "postgresql": {
                        "use_pg_rewind": true,
                        "use_slots": true,
                        "parameters": cluster_wide,
                    },
                },
                "initdb": [
                    "data-checksums",
                    {"encoding": "UTF8"},
                    {"locale": "C"},
                    {"auth-local": "peer"},
                    {"auth-host": "scram-sha-256"},
                ],
            },
            "postgresql": {
                "listen": pg,
                "connect_address": pg,
                "data_dir": dir.join("pgdata"),
                "bin_dir": self.bin,
                "pgpass": dir.join("pgpass"),
                "use_unix_socket": true,
                "authentication": {
                    "superuser": {"username": SUPERUSER},
                    "replication": auth(REPLICATION_ROLE),
                    "rewind": auth(REWIND_ROLE),
                },
                "parameters": local,
                // A replica that cannot stream what it needs (its upstream died while it was
                // restarting, or the new primary lacks the segments) fetches WAL from the
                // archive instead of waiting for ever.
                "recovery_conf": archiving
                    .map(|a| json!({ "restore_command": a.restore_command }))
                    .unwrap_or_else(|| json!({})),
                "pg_hba": hba_lines(Some(REPLICATION_ROLE), &networks),
                // A new replica's base backup starts at once instead of after the leader's
                // spread checkpoint (up to minutes after a busy bootstrap).
                "basebackup": [{"checkpoint": "fast"}],
                "pg_ident": ident_lines(),
            },
            "tags": {"nofailover": false, "noloadbalance": false, "clonefrom": false, "nosync": false},
        });
        // YAML is a superset of JSON: Patroni reads this as its YAML configuration.
        let path = dir.join("patroni.yml");
        pki::write_private(
            &path,
            &serde_json::to_string_pretty(&config).expect("config serializes"),
        )?;
        self.user.chown(&path)?;
        Ok(())
    }

    /// Starts node `name`'s Patroni (which starts, or clones and starts, its PostgreSQL)
    /// and its guard, each unless it runs.
    pub fn start_node(&self, name: &str) -> Result<(), OpsError> {
        self.start_patroni(name)?;
        self.start_guard(name)?;
        Ok(())
    }

    /// Starts node `name`'s Patroni unless it runs (as the server user; the guard, already
    /// that user, restarts it the same way).
    fn start_patroni(&self, name: &str) -> Result<(), OpsError> {
        if self.live_pid(name).is_none() {
            let dir = self.node_dir(name);
            let mut cmd = Command::new(patroni_bin());
            cmd.arg(dir.join("patroni.yml"))
                .current_dir(&dir)
                .env("HOME", &dir);
            self.spawn_daemon(name, cmd, &dir.join("patroni.log"))?;
        }
        Ok(())
    }

    /// Starts node `name`'s guard (`dalp node guard`, [`crate::guard`]) as the server user
    /// unless it runs; true when started. Only a `dalp` binary runs guards: a program that
    /// embeds this library (a test) starts none.
    fn start_guard(&self, name: &str) -> Result<bool, OpsError> {
        let process = guard_name(name);
        if self.live_pid(&process).is_some() {
            return Ok(false);
        }
        let Some(exe) = std::env::current_exe()
            .ok()
            .filter(|e| e.file_name().is_some_and(|f| f == "dalp"))
        else {
            tracing::info!(
                node = name,
                "not the dalp binary: the node runs without its guard"
            );
            return Ok(false);
        };
        let dir = self.node_dir(name);
        let mut cmd = Command::new(exe);
        cmd.args(["node", "guard", "--bundle"])
            .arg(&self.root)
            .args(["--node", name])
            .current_dir(&dir);
        self.spawn_daemon(&process, cmd, &dir.join("guard.log"))?;
        Ok(true)
    }

    /// Runs node `name`'s guard until it is stopped ([`crate::guard`]): each tick it asks
    /// the node's Patroni (`/liveness`), reads the node's role over a held connection and,
    /// now and then, probes the postmaster for new connections; when the judge says so, it
    /// fences the postmaster and its children (SIGKILL) and records why in
    /// `<node>/guard.events`.
    pub async fn guard(&self, name: &str) -> Result<(), OpsError> {
        let node = self
            .node(name)
            .cloned()
            .ok_or_else(|| err("guard", format!("no node `{name}` in this cluster")))?;
        let limits =
            GuardLimits::for_ttl(self.ttl(), Duration::from_secs(self.state.loop_wait.into()));
        let socket = self
            .node_dir(name)
            .join("run")
            .join(format!(".s.PGSQL.{}", node.pg_port));
        let liveness = self.api_url(&node, "/liveness");
        let events = self.node_dir(name).join("guard.events");
        let mut opts = self.superuser_options(name, "postgres");
        opts.application_name = "dalp-guard".into();
        let mut judge = Judge::new(limits, Instant::now());
        let mut restarts = guard::Restarts::new();
        let mut last_probe = None;
        let mut held: Option<tokio_postgres::Client> = None;
        eprintln!(
            "{} guard {name}: fences PostgreSQL when its postmaster answers no new connection for {:?}, or when it is the primary and Patroni answers nothing for {:?}",
            chrono::Utc::now().to_rfc3339(),
            limits.no_connection,
            limits.patroni_silent
        );
        // Says what the guard did in its log, and appends it to guard.events with the time,
        // the node and the action.
        let record = |action: &str, said: String, mut line: Value| {
            let now = chrono::Utc::now();
            let at = now.to_rfc3339();
            eprintln!("{at} guard {name}: {said}");
            line["at"] = json!(at);
            line["unix_ms"] = json!(now.timestamp_millis());
            line["node"] = json!(name);
            line["action"] = json!(action);
            if let Err(e) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&events)
                .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()))
            {
                eprintln!(
                    "{at} guard {name}: cannot record in {}: {e}",
                    events.display()
                );
            }
        };
        loop {
            tokio::time::sleep(limits.tick).await;
            // Patroni's process is gone: start it again (it takes over a running postmaster,
            // or starts PostgreSQL).
            if restarts.due(self.live_pid(name).is_some(), Instant::now()) {
                let outcome = self.start_patroni(name);
                let pid = self.live_pid(name);
                let said = match &outcome {
                    Ok(()) => format!("RESTARTED Patroni (pid {pid:?}): it had exited"),
                    Err(e) => format!("Patroni had exited and did not start again: {e}"),
                };
                record(
                    "restart",
                    said,
                    json!({"patroni": pid, "error": outcome.err().map(|e| e.to_string())}),
                );
                // The judge's clock runs on: a primary whose Patroni does not come back in
                // time is still fenced before its key can expire.
                continue;
            }
            let postmaster = self.postmaster_pid(name);
            let probe_due = postmaster.is_some() && judge.probe_due(last_probe, Instant::now());
            if probe_due {
                last_probe = Some(Instant::now());
            }
            let (probe, patroni, primary) = tokio::join!(
                async {
                    if probe_due {
                        Some(guard::probe_postmaster(&socket, limits.probe_timeout).await)
                    } else {
                        None
                    }
                },
                async {
                    match self
                        .http()
                        .get(&liveness)
                        .timeout(limits.probe_timeout)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                            PatroniProbe::LoopStalled
                        }
                        Ok(_) => PatroniProbe::Live,
                        Err(_) => PatroniProbe::Silent,
                    }
                },
                guard_role(&mut held, &opts, postmaster.is_some(), limits.probe_timeout),
            );
            let Some(why) = judge.observe(
                Instant::now(),
                postmaster.is_some(),
                probe,
                patroni,
                primary,
            ) else {
                continue;
            };
            let pid = postmaster.expect("the judge fences only a running postmaster");
            let signalled = guard::fence_postmaster(pid);
            record(
                "fence",
                format!("FENCED postmaster {pid} ({signalled} processes SIGKILLed): {why}"),
                json!({"postmaster": pid, "signalled": signalled, "reason": why}),
            );
            held = None;
            judge.fenced(Instant::now());
        }
    }

    /// The fences node `name`'s guard recorded (`<node>/guard.events`, oldest first).
    pub fn guard_events(&self, name: &str) -> Vec<Value> {
        self.guard_log(name, "fence")
    }

    /// The times node `name`'s guard started Patroni again (oldest first).
    pub fn guard_restarts(&self, name: &str) -> Vec<Value> {
        self.guard_log(name, "restart")
    }

    /// `<node>/guard.events` lines of one action (a line without one is a fence).
    fn guard_log(&self, name: &str, action: &str) -> Vec<Value> {
        std::fs::read_to_string(self.node_dir(name).join("guard.events"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["action"].as_str().unwrap_or("fence") == action)
            .collect()
    }

    /// SIGKILL to everything of node `name` — its guard, Patroni and postmaster: the host's
    /// crash, as a test inflicts it (its supervisor or `dalp node up` starts it again).
    pub fn kill_node(&self, name: &str) {
        if let Some(pid) = self.live_pid(&guard_name(name)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.kill_patroni(name);
    }

    /// SIGKILL to node `name`'s Patroni and postmaster, its guard left running: a crash of
    /// the node's processes on a host that stays up (the guard starts Patroni again).
    pub fn kill_patroni(&self, name: &str) {
        let postmaster = self.postmaster_pid(name);
        if let Some(pid) = self.live_pid(name) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(pid) = postmaster {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.reap(name, Duration::from_secs(5));
    }

    fn reap(&self, name: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.live_pid(name).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops node `name` cleanly: its guard first (a stopping Patroni must not look like a
    /// dead one), then Patroni, which shuts its PostgreSQL down.
    pub fn stop_node(&self, name: &str) {
        self.stop_daemon(&guard_name(name));
        if let Some(pid) = self.live_pid(name) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            self.reap(name, Duration::from_secs(60));
            if let Some(pid) = self.live_pid(name) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                self.reap(name, Duration::from_secs(5));
            }
        }
        if let Some(pid) = self.postmaster_pid(name) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while process::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if process::alive(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Stops every process of the cluster: the Patronis (and their PostgreSQL), then etcd.
    /// Data stays; `up` again restarts it.
    pub fn down(&self) {
        for n in self.local_nodes() {
            self.stop_node(&n.name);
        }
        for m in self.local_etcd() {
            self.stop_daemon(&m.name);
        }
        self.stop_daemon(BACKUP_SERVER);
    }

    /// Stops daemon `name` of this directory that is not a node — an etcd member or the
    /// `pgbackrest server` (SIGTERM, then SIGKILL after 20 s) — when it runs.
    pub fn stop_daemon(&self, name: &str) {
        if let Some(pid) = self.live_pid(name) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            self.reap(name, Duration::from_secs(20));
            if let Some(pid) = self.live_pid(name) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                self.reap(name, Duration::from_secs(5));
            }
        }
    }

    /// The members as Patroni reports them (asks each node's REST API until one answers).
    pub async fn status(&self) -> Result<ClusterStatus, OpsError> {
        let mut last = String::from("no node answered");
        for n in &self.state.nodes {
            let url = self.api_url(n, "/cluster");
            match self.http().get(&url).send().await {
                Ok(r) if r.status().is_success() => {
                    #[derive(Deserialize)]
                    struct Raw {
                        #[serde(default)]
                        members: Vec<Member>,
                    }
                    let raw: Raw = r.json().await.map_err(|e| err("Patroni /cluster", e))?;
                    let listed: Vec<&str> = raw.members.iter().map(|m| m.name.as_str()).collect();
                    let missing = self
                        .state
                        .nodes
                        .iter()
                        .filter(|n| !listed.contains(&n.name.as_str()))
                        .map(|n| n.name.clone())
                        .collect();
                    return Ok(ClusterStatus {
                        scope: SCOPE.into(),
                        members: raw.members,
                        missing,
                    });
                }
                Ok(r) => last = format!("{url}: HTTP {}", r.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(err(
            "cluster status",
            format!("{last}; is the cluster running? (`dalp cluster up`)"),
        ))
    }

    /// The leader as etcd records it (Patroni's `leader` key), `None` when there is no key.
    /// Fails when etcd does not answer.
    pub async fn dcs_leader(&self) -> Result<Option<String>, OpsError> {
        use data_encoding::BASE64;
        let key = format!("/dalp/{SCOPE}/leader");
        let mut last = String::from("no etcd member");
        let mut answer = None;
        for m in &self.state.etcd {
            let url = format!("{}/v3/kv/range", m.client_url());
            let r = self
                .http()
                .post(&url)
                .json(&json!({ "key": BASE64.encode(key.as_bytes()) }))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    answer = Some(r.json::<Value>().await.map_err(|e| err("etcd", e))?);
                    break;
                }
                Ok(r) => last = format!("{url}: HTTP {}", r.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        let r = answer.ok_or_else(|| err("etcd", last))?;
        Ok(r["kvs"][0]["value"]
            .as_str()
            .and_then(|v| BASE64.decode(v.as_bytes()).ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Asks Patroni, then every node and etcd directly (in parallel, each bounded by a
    /// couple of seconds), and says what disagrees: a leader whose PostgreSQL takes no new
    /// connection (a frozen postmaster), a primary that is not the leader (deposed), a node
    /// whose Patroni does not answer (stopped, stalled or partitioned), etcd down.
    pub async fn inspect(&self) -> ClusterReport {
        const PROBE: Duration = Duration::from_secs(3);
        let status = self.status().await.ok();
        let probes = self.state.nodes.iter().map(|n| async move {
            let patroni = self.patroni_self(n);
            let postgres = async {
                let mut opts = self
                    .node_options(&n.name, dalp_db::Component::Monitor.role())
                    .map_err(|e| e.to_string())?;
                // The maintenance database exists on every node from the start (a replica
                // may still be replaying dalp's CREATE DATABASE).
                opts.dbname = "postgres".into();
                let probe = async {
                    let c = opts.connect().await.map_err(|e| e.to_string())?;
                    c.query_one("SELECT NOT pg_is_in_recovery()", &[])
                        .await
                        .map(|r| r.get::<_, bool>(0))
                        .map_err(|e| e.to_string())
                };
                tokio::time::timeout(PROBE, probe)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {PROBE:?}")))
            };
            let (patroni, postgres) = tokio::join!(patroni, postgres);
            NodeProbe {
                name: n.name.clone(),
                patroni,
                postgres,
            }
        });
        let etcd = self
            .state
            .etcd
            .iter()
            .map(|m| async move { (m.name.clone(), self.etcd_healthy(m, PROBE).await) });
        let (nodes, etcd_members) = tokio::join!(
            futures_util::future::join_all(probes),
            futures_util::future::join_all(etcd)
        );
        let answering = etcd_members.iter().filter(|m| m.1).count();
        let etcd_up = answering * 2 > etcd_members.len();
        let mut problems = Vec::new();
        let leader = status
            .as_ref()
            .and_then(|s| s.leader())
            .map(|m| m.name.clone());
        match &status {
            None => problems.push(
                "no Patroni answers GET /cluster: is the cluster running? (`dalp cluster up`)"
                    .to_string(),
            ),
            Some(s) => {
                if leader.is_none() {
                    problems.push("there is no leader".to_string());
                }
                if !s.missing.is_empty() {
                    problems.push(format!("not running: {}", s.missing.join(", ")));
                }
                if self.state.nodes.len() > 1 && s.sync_standby().is_none() {
                    problems.push("no synchronous standby: commits are not protected".into());
                }
            }
        }
        for n in &nodes {
            let is_leader = leader.as_deref() == Some(n.name.as_str());
            if n.patroni.is_none() {
                problems.push(format!(
                    "{}: Patroni does not answer (stopped, stalled or cut off)",
                    n.name
                ));
            }
            match &n.postgres {
                Err(e) if is_leader => problems.push(format!(
                    "{}: the leader's PostgreSQL takes no new connection ({e}): writes are failing",
                    n.name
                )),
                Err(e) => problems.push(format!(
                    "{}: PostgreSQL takes no new connection ({e})",
                    n.name
                )),
                Ok(true) if !is_leader => problems.push(format!(
                    "{}: runs as a primary but is not the leader (deposed or split off): it must not take writes",
                    n.name
                )),
                Ok(_) => {}
            }
        }
        for (name, up) in &etcd_members {
            if !up && etcd_members.len() > 1 {
                problems.push(format!(
                    "etcd member {name} does not answer (stopped, cut off, or without quorum)"
                ));
            }
        }
        if !etcd_up {
            problems.push(
                "etcd does not answer: failsafe mode keeps the primary only while every member reaches it; restart etcd"
                    .to_string(),
            );
        }
        ClusterReport {
            status,
            nodes,
            etcd_up,
            etcd_members,
            problems,
        }
    }

    /// Waits until there is a leader, every replica streams and (with more than one node) a
    /// synchronous standby exists; returns that view.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<ClusterStatus, OpsError> {
        let n = self.state.nodes.len();
        self.wait_for(
            timeout,
            "every replica streaming with a synchronous standby",
            |s| s.is_healthy(n),
        )
        .await
    }

    /// The current leader's name.
    pub async fn leader(&self) -> Result<String, OpsError> {
        self.status()
            .await?
            .leader()
            .map(|m| m.name.clone())
            .ok_or_else(|| err("cluster status", "there is no leader right now"))
    }

    /// Polls the status until `ok` holds.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&ClusterStatus) -> bool,
    ) -> Result<ClusterStatus, OpsError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status().await {
                Ok(s) if ok(&s) => return Ok(s),
                Ok(s) => format!("{:?}", s.members),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                // The end of each node's Patroni log says why a member is stuck.
                let logs: String = self
                    .state
                    .nodes
                    .iter()
                    .map(|n| {
                        let log = self.node_dir(&n.name).join("patroni.log");
                        // And PostgreSQL's own newest log: why a server does not start.
                        let pg_log = std::fs::read_dir(self.node_dir(&n.name).join("log"))
                            .into_iter()
                            .flatten()
                            .flatten()
                            .map(|e| e.path())
                            .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
                        format!(
                            "{}{}",
                            log_section(&log, 15),
                            pg_log.map(|p| log_section(&p, 8)).unwrap_or_default()
                        )
                    })
                    .collect();
                return Err(err(
                    format!("waiting for {what} ({timeout:?})"),
                    format!("last seen: {last}{logs}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A planned switchover to `candidate` (default: the synchronous standby). Waits until
    /// the new leader runs and returns its name.
    pub async fn switchover(&self, candidate: Option<&str>) -> Result<String, OpsError> {
        let status = self.status().await?;
        let leader = status
            .leader()
            .ok_or_else(|| err("switchover", "there is no leader to switch over from"))?
            .name
            .clone();
        let candidate = match candidate {
            Some(c) => {
                if !status
                    .members
                    .iter()
                    .any(|m| m.name == c && m.role != "leader")
                {
                    return Err(err(
                        "switchover",
                        format!(
                            "`{c}` is not a replica of this cluster (see `dalp cluster status`)"
                        ),
                    ));
                }
                c.to_string()
            }
            None => status
                .sync_standby()
                .or_else(|| status.members.iter().find(|m| m.role != "leader"))
                .ok_or_else(|| err("switchover", "there is no replica to switch over to"))?
                .name
                .clone(),
        };
        let leader_node = self.node(&leader).expect("leader is a node");
        let r = self
            .http()
            .post(self.api_url(leader_node, "/switchover"))
            .basic_auth(API_USER, Some(&self.secrets.roles[API_USER]))
            .json(&json!({"leader": leader, "candidate": candidate}))
            .timeout(Duration::from_secs(90))
            .send()
            .await
            .map_err(|e| err("switchover", e))?;
        let code = r.status();
        let body = r.text().await.unwrap_or_default();
        if !code.is_success() {
            return Err(err(
                "switchover",
                format!("Patroni answered {code}: {body}"),
            ));
        }
        let c = candidate.clone();
        self.wait_for(Duration::from_secs(60), "the new leader", move |s| {
            s.leader().is_some_and(|l| l.name == c)
        })
        .await?;
        Ok(candidate)
    }

    /// The superuser on node `name`'s local socket (peer authentication).
    pub fn superuser_options(&self, name: &str, dbname: &str) -> ConnectOptions {
        let node = self.node(name).expect("known node");
        embedded::socket_superuser(&self.node_dir(name).join("run"), node.pg_port, dbname)
    }

    /// The PostgreSQL port of node `name`.
    pub fn pg_port(&self, name: &str) -> Option<u16> {
        self.node(name).map(|n| n.pg_port)
    }

    /// TLS options for `role` listing every node, writes going to whichever is primary
    /// (`target_session_attrs=read-write`).
    pub fn connect_options(&self, role: &str) -> Result<ConnectOptions, OpsError> {
        let password = self
            .secrets
            .password(role)
            .map_err(|e| err(format!("role {role}"), e))?;
        Ok(ConnectOptions {
            hosts: self
                .state
                .nodes
                .iter()
                .map(|n| (n.address.clone(), n.pg_port))
                .collect(),
            dbname: DATABASE.into(),
            user: role.into(),
            password: Some(password),
            ca_file: Some(self.ca_cert()),
            application_name: "dalp".into(),
            connect_timeout: Duration::from_secs(2),
            statement_timeout: None,
            read_write: true,
        })
    }

    /// Options for `role` on node `name` only, whatever its role.
    pub fn node_options(&self, name: &str, role: &str) -> Result<ConnectOptions, OpsError> {
        let mut o = self.connect_options(role)?;
        let n = self
            .node(name)
            .ok_or_else(|| err("node", format!("no node `{name}`")))?;
        o.hosts = vec![(n.address.clone(), n.pg_port)];
        o.read_write = false;
        Ok(o)
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.down();
        }
    }
}
