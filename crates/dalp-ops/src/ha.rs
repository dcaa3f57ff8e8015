//! A local high-availability cluster: one etcd (v3 API) and N PostgreSQL 15 nodes under
//! Patroni, all on loopback, all run as the `postgres` system user.
//!
//! Replication is synchronous (`synchronous_mode`), replicas stream over TLS
//! (`sslmode=verify-full`) with SCRAM as `dalp_replicator`, a former primary rejoins with
//! `pg_rewind` as `dalp_rewind`, and every node gets the same server settings, `pg_hba.conf`
//! and peer map as the embedded cluster (the superuser only over the local socket).
//!
//! The processes are daemons: they outlive the `dalp cluster up` that started them, and
//! `dalp cluster down` (or [`HaCluster::down`]) stops them by the pids recorded under the
//! cluster directory. Layout:
//! `cluster.json` (ports, timings), `secrets.json` (0600), `tls/`, `etcd/` + `etcd.pid` +
//! `etcd.log`, and per node `nodeN/{patroni.yml, patroni.pid, patroni.log, pgdata/, run/, log/}`.

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

/// One node's ports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterFile {
    etcd_client_port: u16,
    etcd_peer_port: u16,
    nodes: Vec<NodeSpec>,
    ttl: u32,
    loop_wait: u32,
    retry_timeout: u32,
    synchronous_mode_strict: bool,
    #[serde(default)]
    archive: bool,
}

/// One member as Patroni reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `leader`, `sync_standby` or `replica`.
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
    pub fn sync_standby(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.role == "sync_standby")
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
    pub etcd_up: bool,
    /// Everything that is wrong, each in a sentence; empty when healthy.
    pub problems: Vec<String>,
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
}

fn err(context: impl Into<String>, message: impl std::fmt::Display) -> OpsError {
    OpsError::Bootstrap {
        context: context.into(),
        message: message.to_string(),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .expect("HTTP client")
}

impl HaCluster {
    fn node_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn state_path(root: &Path) -> PathBuf {
        root.join("cluster.json")
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
        let state: ClusterFile = serde_json::from_str(&text).map_err(|e| err("cluster.json", e))?;
        let secrets = Secrets::load(&root.join("secrets.json")).map_err(|e| err("secrets", e))?;
        Ok(HaCluster {
            root,
            user: ServerUser::resolve()?,
            secrets,
            state,
            bin: PathBuf::from(embedded::DEFAULT_PG_BIN),
            children: Mutex::new(HashMap::new()),
            stop_on_drop: false,
        })
    }

    /// Creates (first time) or restarts the cluster in `dir` and waits until it has a
    /// leader, every replica streams, and (with more than one node) a synchronous standby.
    /// dalp's roles and database are created once, through the leader.
    pub async fn up(dir: &Path, opts: HaOptions) -> Result<HaCluster, OpsError> {
        opts.validate()?;
        if !Path::new(ETCD_BIN).exists() {
            return Err(err(
                format!("{ETCD_BIN} not found"),
                "install Debian's etcd-server package (scripts/deps.sh does)",
            ));
        }
        check_patroni(&patroni_bin())?;
        let bin = opts
            .bin_dir
            .clone()
            .or_else(|| std::env::var_os("DALP_PG_BIN").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(embedded::DEFAULT_PG_BIN));
        if !bin.join("postgres").exists() {
            return Err(OpsError::MissingBinary(bin.join("postgres")));
        }
        let user = ServerUser::resolve()?;
        std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;
        let root = std::fs::canonicalize(dir)
            .map_err(OpsError::io(format!("resolve {}", dir.display())))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
            .map_err(OpsError::io(format!("chmod {}", root.display())))?;
        user.check_traversable(&root)?;

        let state = match std::fs::read_to_string(Self::state_path(&root)) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| err("cluster.json", e))?,
            Err(_) => ClusterFile {
                etcd_client_port: free_port()?,
                etcd_peer_port: free_port()?,
                nodes: (1..=opts.nodes)
                    .map(|i| -> Result<NodeSpec, OpsError> {
                        Ok(NodeSpec {
                            name: format!("node{i}"),
                            pg_port: free_port()?,
                            api_port: free_port()?,
                        })
                    })
                    .collect::<Result<_, _>>()?,
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
        };
        if let Some(name) = cluster.running_processes().first() {
            return Err(err(
                format!("cluster in {}", cluster.root.display()),
                format!("{name} is already running; see `dalp cluster status`, or stop it with `dalp cluster down`"),
            ));
        }
        std::fs::write(
            Self::state_path(&cluster.root),
            serde_json::to_string_pretty(&cluster.state).expect("state serializes"),
        )
        .map_err(OpsError::io("write cluster.json"))?;
        // From here on, a failure stops whatever was started.
        let cluster = cluster.stop_on_drop(true);
        cluster.start_etcd().await?;
        let backups = cluster.backups()?;
        if let Some(b) = &backups {
            b.write_config()?;
        }
        for node in cluster.state.nodes.clone() {
            let pgdata = cluster.node_dir(&node.name).join("pgdata");
            let archiving = backups.as_ref().map(|b| NodeArchiving {
                archive_command: b.archive_command_for(&pgdata),
                restore_command: b.restore_command_for(&pgdata),
                timeout_secs: b.policy().rpo_secs,
            });
            cluster.write_node_config(&node, &opts, archiving.as_ref())?;
        }
        // A new cluster: the first node bootstraps and the others join once it leads, so
        // they clone from it instead of racing to initdb. A restart: all at once, since in
        // synchronous mode only the former leader or its synchronous standby may lead.
        let restart = cluster
            .state
            .nodes
            .iter()
            .any(|n| cluster.node_dir(&n.name).join("pgdata/PG_VERSION").exists());
        let first = cluster.state.nodes[0].name.clone();
        cluster.start_node(&first)?;
        if !restart {
            cluster
                .wait_for(Duration::from_secs(120), "a leader", |s| {
                    s.leader().is_some()
                })
                .await?;
        }
        for node in cluster.state.nodes.iter().skip(1) {
            cluster.start_node(&node.name)?;
        }
        cluster.wait_healthy(Duration::from_secs(180)).await?;
        let leader = cluster.leader().await?;
        bootstrap_roles_and_database(
            &|db| cluster.superuser_options(&leader, db),
            &cluster.secrets,
        )
        .await?;
        if let Some(b) = cluster.backups()? {
            b.stanza_create()?;
        }
        Ok(cluster.stop_on_drop(false))
    }

    fn pid_file(&self, process: &str) -> PathBuf {
        if process == "etcd" {
            self.root.join("etcd.pid")
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
        let ours = if process == "etcd" {
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

    /// The pid of etcd, when it runs.
    pub fn etcd_pid(&self) -> Option<i32> {
        self.live_pid("etcd")
    }

    /// Starts every piece that is not running — etcd, then each node's Patroni (which starts
    /// or recovers its PostgreSQL) — leaving running ones alone; returns what it started.
    /// The caller waits for health (`wait_for`).
    pub async fn start_missing(&self) -> Result<Vec<String>, OpsError> {
        let mut started = Vec::new();
        if self.etcd_pid().is_none() {
            self.start_etcd().await?;
            started.push("etcd".to_string());
        }
        for n in self.state.nodes.clone() {
            if self.live_pid(&n.name).is_none() {
                self.start_node(&n.name)?;
                started.push(format!("patroni {}", n.name));
            }
        }
        Ok(started)
    }

    /// Starts etcd again (after it stopped or was killed); with `wipe`, its data directory is
    /// emptied first, as when the member's disk is lost. Patroni re-creates its keys.
    pub async fn restart_etcd(&self, wipe: bool) -> Result<(), OpsError> {
        if self.etcd_pid().is_some() {
            return Ok(());
        }
        if wipe {
            let data = self.root.join("etcd");
            std::fs::remove_dir_all(&data)
                .map_err(OpsError::io(format!("remove {}", data.display())))?;
        }
        self.start_etcd().await
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
            .state
            .nodes
            .iter()
            .flat_map(|n| {
                let mut v = Vec::new();
                if self.live_pid(&n.name).is_some() {
                    v.push(format!("patroni {}", n.name));
                }
                if self.postmaster_pid(&n.name).is_some() {
                    v.push(format!("postgres {}", n.name));
                }
                v
            })
            .collect();
        if self.live_pid("etcd").is_some() {
            names.push("etcd".into());
        }
        names
    }

    fn spawn_daemon(&self, name: &str, mut cmd: Command, log: &Path) -> Result<(), OpsError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(OpsError::io(format!("open {}", log.display())))?;
        let err_file = file.try_clone().map_err(OpsError::io("open log"))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err_file);
        self.user.configure_daemon(&mut cmd);
        let child = process::spawn(cmd).map_err(OpsError::io(format!("start {name}")))?;
        std::fs::write(self.pid_file(name), child.id().to_string())
            .map_err(OpsError::io("write pid file"))?;
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), child);
        Ok(())
    }

    async fn start_etcd(&self) -> Result<(), OpsError> {
        let data = self.root.join("etcd");
        std::fs::create_dir_all(&data).map_err(OpsError::io("create etcd dir"))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(OpsError::io("chmod etcd dir"))?;
        self.user.chown(&data)?;
        let client = format!("http://127.0.0.1:{}", self.state.etcd_client_port);
        let peer = format!("http://127.0.0.1:{}", self.state.etcd_peer_port);
        let mut cmd = Command::new(ETCD_BIN);
        cmd.args(["--name", "dalp-etcd", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("dalp-etcd={peer}")])
            .args(["--listen-metrics-urls", ""])
            .current_dir(&self.root)
            .env("ETCD_UNSUPPORTED_ARCH", "");
        self.spawn_daemon("etcd", cmd, &self.root.join("etcd.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{client}/health");
        loop {
            if let Ok(r) = http().get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if self.live_pid("etcd").is_none() || Instant::now() > deadline {
                return Err(err(
                    "etcd did not start",
                    format!("see {}", self.root.join("etcd.log").display()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// pgBackRest for this cluster (every node a target; it backs up the primary), when
    /// the cluster archives.
    pub fn backups(&self) -> Result<Option<crate::backup::Backups>, OpsError> {
        if !self.state.archive {
            return Ok(None);
        }
        let policy = crate::backup::Policy::load(&self.root.join("backup.toml"))?;
        let targets = self
            .state
            .nodes
            .iter()
            .map(|n| crate::backup::PgTarget {
                data_dir: self.node_dir(&n.name).join("pgdata"),
                socket_dir: self.node_dir(&n.name).join("run"),
                port: Some(n.pg_port),
            })
            .collect();
        crate::backup::Backups::new(&self.root.join("backup"), policy, targets).map(Some)
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
        ] {
            cluster_wide.insert(k.into(), json!(v));
        }
        let ca = self.ca_cert().display().to_string();
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
            "restapi": {
                "listen": format!("127.0.0.1:{}", node.api_port),
                "connect_address": format!("127.0.0.1:{}", node.api_port),
                "authentication": {"username": API_USER, "password": self.secrets.roles[API_USER]},
            },
            "etcd3": {"hosts": [format!("127.0.0.1:{}", s.etcd_client_port)]},
            "bootstrap": {
                "dcs": {
                    "ttl": s.ttl,
                    "loop_wait": s.loop_wait,
                    "retry_timeout": s.retry_timeout,
                    "maximum_lag_on_failover": 1048576,
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
                "listen": format!("127.0.0.1:{}", node.pg_port),
                "connect_address": format!("127.0.0.1:{}", node.pg_port),
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
                "pg_hba": hba_lines(Some(REPLICATION_ROLE)),
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

    /// Starts node `name`'s Patroni (which starts, or clones and starts, its PostgreSQL).
    pub fn start_node(&self, name: &str) -> Result<(), OpsError> {
        if self.live_pid(name).is_some() {
            return Ok(());
        }
        let dir = self.node_dir(name);
        let mut cmd = Command::new(patroni_bin());
        cmd.arg(dir.join("patroni.yml"))
            .current_dir(&dir)
            .env("HOME", &dir);
        self.spawn_daemon(name, cmd, &dir.join("patroni.log"))
    }

    /// SIGKILL to node `name`'s Patroni and postmaster: a crash, as a test inflicts it.
    pub fn kill_node(&self, name: &str) {
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

    /// Stops node `name` cleanly (Patroni shuts its PostgreSQL down first).
    pub fn stop_node(&self, name: &str) {
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
        for n in &self.state.nodes {
            self.stop_node(&n.name);
        }
        if let Some(pid) = self.live_pid("etcd") {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            self.reap("etcd", Duration::from_secs(20));
            if let Some(pid) = self.live_pid("etcd") {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                self.reap("etcd", Duration::from_secs(5));
            }
        }
    }

    /// The members as Patroni reports them (asks each node's REST API until one answers).
    pub async fn status(&self) -> Result<ClusterStatus, OpsError> {
        let mut last = String::from("no node answered");
        for n in &self.state.nodes {
            let url = format!("http://127.0.0.1:{}/cluster", n.api_port);
            match http().get(&url).send().await {
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
        let url = format!(
            "http://127.0.0.1:{}/v3/kv/range",
            self.state.etcd_client_port
        );
        let r: Value = http()
            .post(&url)
            .json(&json!({ "key": BASE64.encode(key.as_bytes()) }))
            .send()
            .await
            .map_err(|e| err("etcd", e))?
            .json()
            .await
            .map_err(|e| err("etcd", e))?;
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
            let patroni = async {
                let r: Value = http()
                    .get(format!("http://127.0.0.1:{}/patroni", n.api_port))
                    .timeout(PROBE)
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
            };
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
        let (nodes, etcd_up) = tokio::join!(futures_util::future::join_all(probes), async {
            http()
                .get(format!(
                    "http://127.0.0.1:{}/health",
                    self.state.etcd_client_port
                ))
                .timeout(PROBE)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        });
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
                            "\n--- {} ---\n{}{}",
                            log.display(),
                            process::log_tail(&log, 15),
                            pg_log
                                .map(|p| format!(
                                    "\n--- {} ---\n{}",
                                    p.display(),
                                    process::log_tail(&p, 8)
                                ))
                                .unwrap_or_default()
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
        let api = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == leader)
            .expect("leader is a node")
            .api_port;
        let r = http()
            .post(format!("http://127.0.0.1:{api}/switchover"))
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
        let node = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .expect("known node");
        embedded::socket_superuser(&self.node_dir(name).join("run"), node.pg_port, dbname)
    }

    /// The PostgreSQL port of node `name`.
    pub fn pg_port(&self, name: &str) -> Option<u16> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.pg_port)
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
                .map(|n| ("127.0.0.1".to_string(), n.pg_port))
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
        let port = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| err("node", format!("no node `{name}`")))?
            .pg_port;
        o.hosts = vec![("127.0.0.1".into(), port)];
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
