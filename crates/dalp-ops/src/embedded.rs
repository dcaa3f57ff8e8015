//! The embedded cluster: one PostgreSQL 15 instance in a data directory, TLS-only on
//! loopback, with dalp's roles and database, run as the `postgres` system user when dalp
//! runs as root.
//!
//! Layout of the data directory:
//! `pgdata/` (PostgreSQL), `tls/` (CA and server certificate), `run/` (Unix socket),
//! `log/postgres.log`, `secrets.json` (role passwords, 0600), `instance.json` (port),
//! `dalp.lock` (held by the running dalp).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dalp_db::connect::ConnectOptions;
use dalp_db::{roles, Secrets};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::error::OpsError;
use crate::pki;
use crate::process::{self, ServerUser};

/// The database dalp keeps its schemas in.
pub const DATABASE: &str = "dalp";
/// The bootstrap superuser, reachable only over the local socket.
pub const SUPERUSER: &str = "postgres";
/// Where Debian's PostgreSQL 15 binaries live; `DALP_PG_BIN` overrides.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// `root` is made absolute against the current directory (it need not exist yet).
    pub fn new(root: &Path) -> Layout {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(root))
                .unwrap_or_else(|_| root.to_path_buf())
        };
        Layout { root }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn pgdata(&self) -> PathBuf {
        self.root.join("pgdata")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join(pki::CA_CERT)
    }
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("log").join("postgres.log")
    }
    /// Key files (PII key-encryption keys, audit signing key), 0600, created on first use.
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn secrets_file(&self) -> PathBuf {
        self.root.join("secrets.json")
    }
    fn state_file(&self) -> PathBuf {
        self.root.join("instance.json")
    }
    fn lock_file(&self) -> PathBuf {
        self.root.join("dalp.lock")
    }

    fn read_state(&self) -> Option<State> {
        let text = std::fs::read_to_string(self.state_file()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The port the instance uses (recorded at its last start).
    pub fn port(&self) -> Option<u16> {
        self.read_state().map(|s| s.pg_port)
    }

    /// The superuser over the instance's local socket (peer authentication), on `dbname`.
    /// Fails when the instance was never started.
    pub fn superuser_options(&self, dbname: &str) -> Result<ConnectOptions, OpsError> {
        let port = self.port().ok_or_else(|| OpsError::Bootstrap {
            context: format!("no instance in {}", self.root.display()),
            message: "start it once with `dalp up`".into(),
        })?;
        Ok(socket_superuser(&self.socket_dir(), port, dbname))
    }

    /// TCP + verify-full options for `role` on the instance's database, password from the
    /// secrets file. Fails when the instance was never started.
    pub fn connect_options(&self, role: &str) -> Result<ConnectOptions, OpsError> {
        let port = self.port().ok_or_else(|| OpsError::Bootstrap {
            context: format!("no instance in {}", self.root.display()),
            message: "start it once with `dalp up`".into(),
        })?;
        let secrets = Secrets::load(&self.secrets_file()).map_err(|e| OpsError::Bootstrap {
            context: "reading role passwords".into(),
            message: e.to_string(),
        })?;
        let password = secrets.password(role).map_err(|e| OpsError::Bootstrap {
            context: format!("role {role}"),
            message: e.to_string(),
        })?;
        Ok(tcp_options(
            port,
            &self.ca_cert(),
            role,
            Some(password),
            DATABASE,
        ))
    }
}

fn tcp_options(
    port: u16,
    ca: &Path,
    user: &str,
    password: Option<String>,
    dbname: &str,
) -> ConnectOptions {
    ConnectOptions {
        hosts: vec![("127.0.0.1".into(), port)],
        dbname: dbname.into(),
        user: user.into(),
        password,
        ca_file: Some(ca.to_path_buf()),
        application_name: "dalp".into(),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: None,
        read_write: false,
    }
}

/// The superuser over the Unix socket in `socket_dir` (peer authentication).
pub(crate) fn socket_superuser(socket_dir: &Path, port: u16, dbname: &str) -> ConnectOptions {
    ConnectOptions {
        hosts: vec![(socket_dir.display().to_string(), port)],
        dbname: dbname.into(),
        user: SUPERUSER.into(),
        password: None,
        ca_file: None,
        application_name: "dalp-bootstrap".into(),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: None,
        read_write: false,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    pg_port: u16,
}

/// How to start the cluster.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Port to listen on; default: the port of the last start if free, else a free one.
    pub pg_port: Option<u16>,
    /// Directory of `initdb` and `postgres`; default `DALP_PG_BIN` or [`DEFAULT_PG_BIN`].
    pub bin_dir: Option<PathBuf>,
    /// pgAudit session classes (when pgAudit is installed); default [`DEFAULT_PGAUDIT_LOG`].
    pub pgaudit_log: Option<String>,
    /// Statements slower than this have their plans logged (auto_explain); default
    /// [`DEFAULT_SLOW_QUERY_MS`].
    pub slow_query_ms: Option<u32>,
    /// `max_connections`; default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: Option<u32>,
    /// Archive WAL with this `archive_command` (see [`crate::backup::Backups`]); default off.
    pub archive_command: Option<String>,
    /// With archiving: switch WAL segments at least this often (the policy's RPO); default 60.
    pub archive_timeout_secs: Option<u32>,
    /// Start a bare server the way a managed service hands one over (tests emulate RDS &c.
    /// with it): no dalp roles or database are created and nothing is preloaded (no pgAudit,
    /// pg_stat_statements or auto_explain). Default off.
    pub managed: bool,
}

/// Settings dalp changes on a running server, included after `dalp.conf`.
pub const LIVE_CONF: &str = "dalp.live.conf";

/// Server connections unless configured (a pooler lets far more clients share them).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 200;

/// auto_explain's threshold unless configured.
pub const DEFAULT_SLOW_QUERY_MS: u32 = 500;

/// Database-level audit by default: writes, DDL and role changes, plus object audit of the
/// PII tables through [`dalp_db::component::PGAUDIT_ROLE`].
pub const DEFAULT_PGAUDIT_LOG: &str = "write, ddl, role";

/// Checks a pgAudit class list: comma-separated, each optionally prefixed with `-`.
pub fn parse_pgaudit_classes(s: &str) -> Result<String, OpsError> {
    const CLASSES: [&str; 9] = [
        "read", "write", "function", "role", "ddl", "misc", "misc_set", "all", "none",
    ];
    let parts: Vec<String> = s.split(',').map(|c| c.trim().to_lowercase()).collect();
    for p in &parts {
        if !CLASSES.contains(&p.trim_start_matches('-')) {
            return Err(OpsError::Bootstrap {
                context: format!("pgAudit class `{p}`"),
                message: format!("unknown; classes are {}", CLASSES.join(", ")),
            });
        }
    }
    Ok(parts.join(", "))
}

/// A data directory locked for our exclusive use.
pub struct Instance {
    layout: Layout,
    user: ServerUser,
    secrets: Secrets,
    _lock: Flock<File>,
}

pub(crate) fn pg_bin(opts: &StartOptions) -> PathBuf {
    opts.bin_dir
        .clone()
        .or_else(|| std::env::var_os("DALP_PG_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN))
}

fn quote_conf(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The pid recorded in `pgdata/postmaster.pid` when that process is a live postgres.
fn live_postmaster(pgdata: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (process::alive(pid) && comm.trim() == "postgres").then_some(pid)
}

/// Whether `port` is free on both loopback addresses.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && match TcpListener::bind(("::1", port)) {
            Ok(_) => true,
            // No IPv6 loopback on this machine: only IPv4 matters.
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
        }
}

/// The kernel's range for outgoing connections' source ports (`ip_local_port_range`).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A port that is free right now on loopback, outside the kernel's ephemeral range: a
/// server is started on it later (and again after every restart), and meanwhile any
/// outgoing connection could take an ephemeral port as its source port — a replica then
/// failed to start with "Address already in use" and stayed "starting".
pub fn free_port() -> Result<u16, OpsError> {
    use rand::Rng;
    let (lo, hi) = ephemeral_ports();
    let (from, to) = if lo > 11_000 {
        (10_000, lo - 1)
    } else {
        (hi.saturating_add(1).max(1024), u16::MAX)
    };
    // A port is free when checked but bound only later (by a server this process starts):
    // never hand the same one out twice in a process, so two clusters started side by side
    // (tests run in threads) cannot both be given it.
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(from..=to);
        if !handed.contains(&port) && port_is_free(port) {
            handed.push(port);
            return Ok(port);
        }
    }
    Err(OpsError::Io {
        context: "find a free port".into(),
        source: std::io::Error::other(format!("no free port in {from}..={to} after 200 tries")),
    })
}

/// Where a server's files are, for [`server_settings`].
pub(crate) struct ServerConf<'a> {
    pub bin: &'a Path,
    pub socket_dir: &'a Path,
    pub tls_dir: &'a Path,
    pub log_dir: &'a Path,
    pub pgaudit_log: &'a str,
    pub slow_ms: u32,
    pub max_connections: u32,
    /// WAL archiving: the `archive_command` (pgBackRest's archive-push), or none.
    pub archive_command: Option<&'a str>,
    /// With archiving, the longest a committed transaction waits to be archived (`archive_timeout`).
    pub archive_timeout_secs: u32,
}

/// The server settings every dalp-run PostgreSQL gets (embedded and HA nodes): TLS only,
/// SCRAM, pgAudit and query analysis when installed, JSON logs for shipping. Values are
/// unquoted; listen address and port are the caller's.
pub(crate) fn server_settings(c: &ServerConf<'_>) -> Vec<(&'static str, String)> {
    let lib_dir = c.bin.parent().map(|p| p.join("lib")).unwrap_or_default();
    let preload: Vec<&str> = ["pgaudit", "pg_stat_statements", "auto_explain"]
        .into_iter()
        .filter(|l| lib_dir.join(format!("{l}.so")).exists())
        .collect();
    let mut s = vec![
        (
            "unix_socket_directories",
            c.socket_dir.display().to_string(),
        ),
        ("unix_socket_permissions", "0700".into()),
        ("ssl", "on".into()),
        (
            "ssl_cert_file",
            c.tls_dir.join(pki::SERVER_CERT).display().to_string(),
        ),
        (
            "ssl_key_file",
            c.tls_dir.join(pki::SERVER_KEY).display().to_string(),
        ),
        ("ssl_min_protocol_version", "TLSv1.2".into()),
        // Client certificates (the administrator's second factor) chain to our CA and are
        // checked against its revocation list.
        (
            "ssl_ca_file",
            c.tls_dir.join(pki::CA_CERT).display().to_string(),
        ),
        (
            "ssl_crl_file",
            c.tls_dir.join(pki::CRL).display().to_string(),
        ),
        ("password_encryption", "scram-sha-256".into()),
        ("shared_preload_libraries", preload.join(",")),
        ("max_connections", c.max_connections.to_string()),
        ("log_line_prefix", "%m [%p] %q%u@%d/%a ".into()),
        // Every login (who, from where, with which TLS) is on record.
        ("log_connections", "on".into()),
        ("log_disconnections", "on".into()),
        // Server logs as JSON lines (pgAudit's AUDIT entries among them), for shipping.
        ("logging_collector", "on".into()),
        ("log_destination", "stderr,jsonlog".into()),
        ("log_directory", c.log_dir.display().to_string()),
        ("log_filename", "postgresql-%Y-%m-%d.log".into()),
        ("log_file_mode", "0640".into()),
        // Log times in UTC: shipped pgAudit lines carry them as their RFC 5424 time.
        ("log_timezone", "UTC".into()),
    ];
    if let Some(cmd) = c.archive_command {
        // Continuous archiving; a quiet server still switches segments every RPO seconds,
        // so the archive trails now by at most that.
        s.extend([
            ("archive_mode", "on".to_string()),
            ("archive_command", cmd.to_string()),
            ("archive_timeout", format!("{}s", c.archive_timeout_secs)),
        ]);
    }
    if preload.contains(&"auto_explain") {
        // Query analysis: statement statistics, and plans of slow statements logged.
        s.extend([
            ("pg_stat_statements.track", "top".to_string()),
            ("pg_stat_statements.max", "5000".into()),
            ("track_io_timing", "on".into()),
            ("auto_explain.log_min_duration", format!("{}ms", c.slow_ms)),
            ("auto_explain.log_format", "text".into()),
            ("auto_explain.log_nested_statements", "on".into()),
        ]);
    }
    if preload.contains(&"pgaudit") {
        s.extend([
            ("pgaudit.log", c.pgaudit_log.to_string()),
            ("pgaudit.log_parameter", "off".into()),
            ("pgaudit.log_catalog", "off".into()),
            ("pgaudit.role", dalp_db::component::PGAUDIT_ROLE.into()),
        ]);
    }
    s
}

/// `pg_ident.conf` lines: who may act as the superuser over the local socket.
pub(crate) fn ident_lines() -> Vec<String> {
    let os_user = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into());
    vec![
        format!("dalp_superuser {SUPERUSER} {SUPERUSER}"),
        format!("dalp_superuser {os_user} {SUPERUSER}"),
    ]
}

/// `pg_hba.conf` lines: the superuser only over the local socket by OS identity (peer);
/// TCP only with TLS and SCRAM, never as the superuser. `replication` names the role that
/// may stream WAL (HA clusters).
/// `pg_hba.conf`: the superuser on the socket only; over TCP, TLS with SCRAM (and a client
/// certificate for the administrator) from loopback and `networks` (CIDR), nothing else.
pub(crate) fn hba_lines(replication: Option<&str>, networks: &[String]) -> Vec<String> {
    let su = SUPERUSER;
    let nets: Vec<String> = ["127.0.0.1/32", "::1/128"]
        .into_iter()
        .map(String::from)
        .chain(
            networks
                .iter()
                .filter(|n| !n.starts_with("127.0.0.1/") && n.as_str() != "::1/128")
                .cloned(),
        )
        .collect();
    let mut l = vec![
        format!("local all {su} peer map=dalp_superuser"),
        // pg_basebackup and other physical tools, for the superuser on the socket only.
        format!("local replication {su} peer map=dalp_superuser"),
        // The pooler beside the server connects over the socket (mode 0700: only the
        // server's OS user, which runs PgBouncer, reaches it), with SCRAM; never the
        // administrator, who must present a client certificate over TCP.
        format!("local all {} reject", dalp_db::component::ADMIN_ROLE),
        "local replication all reject".to_string(),
        "local all all scram-sha-256".to_string(),
        "hostnossl all all 0.0.0.0/0 reject".into(),
        "hostnossl all all ::/0 reject".into(),
        format!("hostssl all {su} 0.0.0.0/0 reject"),
        format!("hostssl all {su} ::/0 reject"),
    ];
    // The administrator: both a client certificate issued to that role by our CA (not
    // revoked, not expired) and the SCRAM password.
    let admin = dalp_db::component::ADMIN_ROLE;
    for n in &nets {
        l.push(format!(
            "hostssl all {admin} {n} scram-sha-256 clientcert=verify-full"
        ));
    }
    if let Some(r) = replication {
        for n in &nets {
            l.push(format!("hostssl replication {r} {n} scram-sha-256"));
        }
    }
    for n in &nets {
        l.push(format!("hostssl all all {n} scram-sha-256"));
    }
    l
}

impl Instance {
    /// Creates (if needed) and locks `dir`. Fails clearly when another dalp holds it, when a
    /// PostgreSQL server without a dalp still runs on it, or when the `postgres` user could
    /// not reach it.
    pub fn open(dir: &Path) -> Result<Instance, OpsError> {
        let user = ServerUser::resolve()?;
        std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;
        let root = std::fs::canonicalize(dir)
            .map_err(OpsError::io(format!("resolve {}", dir.display())))?;
        let layout = Layout { root };
        // Servers must be able to enter the directory, but not list it.
        std::fs::set_permissions(layout.root(), std::fs::Permissions::from_mode(0o711))
            .map_err(OpsError::io(format!("chmod {}", layout.root().display())))?;
        user.check_traversable(layout.root())?;

        let mut lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(layout.lock_file())
            .map_err(OpsError::io("open lock file"))?;
        let mut lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut f, _)) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                lock_file = f;
                drop(lock_file);
                return Err(OpsError::InUse {
                    dir: layout.root().to_path_buf(),
                    pid: if pid.trim().is_empty() {
                        "unknown".into()
                    } else {
                        pid.trim().to_string()
                    },
                });
            }
        };
        lock.set_len(0).map_err(OpsError::io("write lock file"))?;
        lock.rewind().map_err(OpsError::io("write lock file"))?;
        write!(lock, "{}", std::process::id()).map_err(OpsError::io("write lock file"))?;

        if let Some(pid) = live_postmaster(&layout.pgdata()) {
            return Err(OpsError::OrphanServer {
                pgdata: layout.pgdata(),
                pid,
            });
        }

        let secrets = if layout.secrets_file().exists() {
            let mut s = Secrets::load(&layout.secrets_file()).map_err(|e| OpsError::Bootstrap {
                context: "reading role passwords".into(),
                message: e.to_string(),
            })?;
            // Roles added by a newer dalp get their password now.
            let mut added = false;
            for role in dalp_db::component::login_roles()
                .chain(std::iter::once(dalp_db::component::ADMIN_ROLE))
            {
                if !s.roles.contains_key(role) {
                    s.roles
                        .insert(role.to_string(), roles::generate_password(32));
                    added = true;
                }
            }
            if added {
                let text = serde_json::to_string_pretty(&s).expect("secrets serialize");
                pki::write_private(&layout.secrets_file(), &text)?;
            }
            s
        } else {
            let s = roles::generate_secrets();
            let text = serde_json::to_string_pretty(&s).expect("secrets serialize");
            pki::write_private(&layout.secrets_file(), &text)?;
            s
        };
        Ok(Instance {
            layout,
            user,
            secrets,
            _lock: lock,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Initialises (first time), configures and starts the server, waits until it accepts
    /// connections, and makes sure dalp's roles and database exist.
    pub async fn start(self, opts: StartOptions) -> Result<RunningCluster, OpsError> {
        let bin = pg_bin(&opts);
        for b in ["initdb", "postgres"] {
            if !bin.join(b).exists() {
                return Err(OpsError::MissingBinary(bin.join(b)));
            }
        }
        let tls = self.layout.tls_dir();
        pki::ensure(&tls, &self.user)?;
        if !tls.join(pki::CRL).exists() {
            pki::write_crl(&tls)?;
        }
        std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o755))
            .map_err(OpsError::io("chmod tls dir"))?;

        if !self.layout.pgdata().join("PG_VERSION").exists() {
            self.initdb(&bin)?;
        }
        let port = self.choose_port(opts.pg_port)?;
        let pgaudit_log =
            parse_pgaudit_classes(opts.pgaudit_log.as_deref().unwrap_or(DEFAULT_PGAUDIT_LOG))?;
        self.write_config(&bin, port, &pgaudit_log, &opts)?;

        let log_path = self.layout.log_file();
        let log_dir = log_path.parent().expect("log file has a parent");
        std::fs::create_dir_all(log_dir).map_err(OpsError::io("create log dir"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(OpsError::io(format!("open {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(OpsError::io("open log"))?;
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.layout.pgdata())
            .current_dir(self.layout.root())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        self.user.configure(&mut cmd);
        let child = process::spawn(cmd).map_err(OpsError::io("start postgres"))?;
        let state = serde_json::to_string(&State { pg_port: port }).expect("state serializes");
        std::fs::write(self.layout.state_file(), state)
            .map_err(OpsError::io("write instance.json"))?;

        let running = RunningCluster {
            instance: self,
            port,
            child: Mutex::new(Some(child)),
            after_stop: Mutex::new(Vec::new()),
        };
        running.wait_ready(Duration::from_secs(60)).await?;
        if !opts.managed {
            running.bootstrap().await?;
        }
        Ok(running)
    }

    fn initdb(&self, bin: &Path) -> Result<(), OpsError> {
        let target = self.layout.pgdata();
        let staging = self.layout.root().join("pgdata.init");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(OpsError::io("remove half-made pgdata.init"))?;
        }
        std::fs::create_dir(&staging).map_err(OpsError::io("create pgdata.init"))?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
            .map_err(OpsError::io("chmod pgdata.init"))?;
        self.user.chown(&staging)?;
        let mut cmd = Command::new(bin.join("initdb"));
        cmd.arg("-D")
            .arg(&staging)
            .args([
                "--username",
                SUPERUSER,
                "--data-checksums",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .current_dir(self.layout.root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.user.configure(&mut cmd);
        let child = process::spawn(cmd).map_err(OpsError::io("run initdb"))?;
        let out = child
            .wait_with_output()
            .map_err(OpsError::io("run initdb"))?;
        if !out.status.success() {
            return Err(OpsError::Initdb {
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        std::fs::rename(&staging, &target).map_err(OpsError::io("move pgdata into place"))?;
        Ok(())
    }

    fn choose_port(&self, requested: Option<u16>) -> Result<u16, OpsError> {
        if let Some(p) = requested {
            if !port_is_free(p) {
                return Err(OpsError::PortInUse {
                    port: p,
                    host: "127.0.0.1".into(),
                    flag: "--pg-port",
                });
            }
            return Ok(p);
        }
        match self.layout.port() {
            Some(p) if port_is_free(p) => Ok(p),
            _ => free_port(),
        }
    }

    /// Rewrites dalp's configuration on every start: `dalp.conf` (included from
    /// postgresql.conf), a TLS-only `pg_hba.conf` and the peer map for the superuser.
    fn write_config(
        &self,
        bin: &Path,
        port: u16,
        pgaudit_log: &str,
        opts: &StartOptions,
    ) -> Result<(), OpsError> {
        let pgdata = self.layout.pgdata();
        let socket_dir = self.layout.socket_dir();
        std::fs::create_dir_all(&socket_dir).map_err(OpsError::io("create socket dir"))?;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(OpsError::io("chmod socket dir"))?;
        self.user.chown(&socket_dir)?;
        // The socket path must fit in sun_path (107 bytes).
        let socket_len = socket_dir
            .join(format!(".s.PGSQL.{port}.lock"))
            .as_os_str()
            .len();
        if socket_len > 100 {
            return Err(OpsError::Bootstrap {
                context: format!("data directory {}", self.layout.root().display()),
                message: "its path is too long for a Unix socket; choose a shorter --data-dir"
                    .into(),
            });
        }

        let tls = self.layout.tls_dir();
        let log_dir = self
            .layout
            .log_file()
            .parent()
            .expect("log dir")
            .to_path_buf();
        std::fs::create_dir_all(&log_dir).map_err(OpsError::io("create log dir"))?;
        self.user.chown(&log_dir)?;
        let mut settings = vec![
            ("listen_addresses", "127.0.0.1,::1".to_string()),
            ("port", port.to_string()),
        ];
        settings.extend(server_settings(&ServerConf {
            bin,
            socket_dir: &socket_dir,
            tls_dir: &tls,
            log_dir: &log_dir,
            pgaudit_log,
            slow_ms: opts.slow_query_ms.unwrap_or(DEFAULT_SLOW_QUERY_MS),
            max_connections: opts.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            archive_command: opts.archive_command.as_deref(),
            archive_timeout_secs: opts.archive_timeout_secs.unwrap_or(60),
        }));
        if opts.managed {
            settings.retain(|(k, _)| {
                *k != "shared_preload_libraries"
                    && !["pgaudit.", "auto_explain.", "pg_stat_statements."]
                        .iter()
                        .any(|p| k.starts_with(p))
            });
        }
        let mut conf =
            String::from("# Written by dalp at every start; local edits are overwritten.\n");
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {}\n", quote_conf(&v)));
        }
        let ident = format!(
            "# Written by dalp: who may act as the superuser over the local socket.\n{}\n",
            ident_lines().join("\n")
        );
        let hba = format!(
            "# Written by dalp at every start; local edits are overwritten.\n{}\n",
            hba_lines(None, &[]).join("\n")
        );
        for (name, text) in [
            ("dalp.conf", conf),
            ("pg_hba.conf", hba),
            ("pg_ident.conf", ident),
            (
                LIVE_CONF,
                "# Written by dalp on a running server (a WAL receiver's synchronous_standby_names); emptied at every start.\n".to_string(),
            ),
        ] {
            let p = pgdata.join(name);
            std::fs::write(&p, text).map_err(OpsError::io(format!("write {}", p.display())))?;
            self.user.chown(&p)?;
        }
        let main_conf = pgdata.join("postgresql.conf");
        let current =
            std::fs::read_to_string(&main_conf).map_err(OpsError::io("read postgresql.conf"))?;
        for line in ["include 'dalp.conf'", "include_if_exists 'dalp.live.conf'"] {
            if !current.contains(line) {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&main_conf)
                    .map_err(OpsError::io("append to postgresql.conf"))?;
                writeln!(f, "\n{line}").map_err(OpsError::io("append to postgresql.conf"))?;
            }
        }
        Ok(())
    }
}

/// A started cluster. Dropping it stops the server (fast shutdown).
pub struct RunningCluster {
    instance: Instance,
    port: u16,
    child: Mutex<Option<Child>>,
    /// What runs beside the server (a WAL receiver) and stops after it.
    after_stop: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

impl RunningCluster {
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn pid(&self) -> Option<u32> {
        self.child_slot().as_ref().map(|c| c.id())
    }

    fn child_slot(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn layout(&self) -> &Layout {
        &self.instance.layout
    }
    pub fn secrets(&self) -> &Secrets {
        &self.instance.secrets
    }

    /// The superuser over the local socket (peer authentication), on `dbname`.
    pub fn superuser_options(&self, dbname: &str) -> ConnectOptions {
        socket_superuser(&self.layout().socket_dir(), self.port, dbname)
    }

    /// TCP + TLS (verify-full) options for `role` on `dbname`, with its password.
    pub fn role_options(&self, role: &str, dbname: &str) -> ConnectOptions {
        tcp_options(
            self.port,
            &self.layout().ca_cert(),
            role,
            self.secrets().password(role).ok(),
            dbname,
        )
    }

    fn log_tail(&self) -> String {
        process::log_tail(&self.layout().log_file(), 15)
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<(), OpsError> {
        let deadline = Instant::now() + timeout;
        let opts = self.superuser_options("postgres");
        loop {
            let exited = {
                let mut slot = self.child_slot();
                let status = slot.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if status.is_some() {
                    *slot = None;
                }
                status
            };
            if let Some(status) = exited {
                {
                    return Err(OpsError::StartFailed {
                        reason: format!("the server exited ({status})"),
                        log: self.layout().log_file(),
                        tail: self.log_tail(),
                    });
                }
            }
            match opts.connect().await {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    return Err(OpsError::StartFailed {
                        reason: format!("not accepting connections after {timeout:?}: {e}"),
                        log: self.layout().log_file(),
                        tail: self.log_tail(),
                    })
                }
            }
        }
    }

    /// Roles, the `dalp` database and its grants. Idempotent.
    async fn bootstrap(&self) -> Result<(), OpsError> {
        bootstrap_roles_and_database(&|db| self.superuser_options(db), self.secrets()).await
    }

    /// Creates `dbname` (if missing) with dalp's database-level grants, as the superuser.
    pub async fn create_database(
        &self,
        su: &tokio_postgres::Client,
        dbname: &str,
    ) -> Result<(), OpsError> {
        create_database_as(&|db| self.superuser_options(db), su, dbname).await
    }

    /// Runs `f` when the server has stopped (to stop what runs beside it).
    pub fn after_stop(&self, f: Box<dyn FnOnce() + Send>) {
        self.after_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
    }

    /// The file of settings dalp changes on a running server (today
    /// `synchronous_standby_names` once a WAL receiver streams); emptied at every start.
    pub fn live_conf(&self) -> PathBuf {
        self.layout().pgdata().join(LIVE_CONF)
    }

    /// Stops the server and releases the data directory for another dalp.
    pub fn shutdown(self) -> Result<(), OpsError> {
        self.stop()
        // Dropping `self` releases the directory lock.
    }

    /// Fast shutdown (SIGINT), waiting up to a minute before killing. Idempotent. The data
    /// directory stays locked until the value is dropped (see [`RunningCluster::shutdown`]).
    pub fn stop(&self) -> Result<(), OpsError> {
        let child = self.child_slot().take();
        if let Some(mut child) = child {
            process::stop_child(&mut child, Signal::SIGINT, Duration::from_secs(60))
                .map_err(OpsError::io("stop postgres"))?;
        }
        let companions: Vec<_> = self
            .after_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for stop in companions {
            stop();
        }
        Ok(())
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "stopping postgres");
        }
    }
}

fn bootstrap_err(context: &str, e: &dyn std::fmt::Display) -> OpsError {
    OpsError::Bootstrap {
        context: context.into(),
        message: e.to_string(),
    }
}

/// dalp's roles (passwords from `secrets`), the `dalp` database and its grants, through the
/// superuser options `su` gives per database. Idempotent; used by every cluster dalp runs.
pub(crate) async fn bootstrap_roles_and_database(
    su: &dyn Fn(&str) -> ConnectOptions,
    secrets: &Secrets,
) -> Result<(), OpsError> {
    let client = su("postgres")
        .connect()
        .await
        .map_err(|e| bootstrap_err("connect as superuser", &e))?;
    roles::ensure_roles(&client, secrets)
        .await
        .map_err(|e| bootstrap_err("create roles", &e))?;
    create_database_as(su, &client, DATABASE).await
}

/// Creates `dbname` (if missing) and applies dalp's database-level grants in it.
pub(crate) async fn create_database_as(
    su_options: &dyn Fn(&str) -> ConnectOptions,
    su: &tokio_postgres::Client,
    dbname: &str,
) -> Result<(), OpsError> {
    let exists: bool = su
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&dbname],
        )
        .await
        .map_err(|e| bootstrap_err("look up database", &e))?
        .get(0);
    if !exists {
        su.batch_execute(&format!(
            "CREATE DATABASE {}",
            dalp_db::sql::quote_ident(dbname)
        ))
        .await
        .map_err(|e| bootstrap_err("create database", &e))?;
    }
    let db = su_options(dbname)
        .connect()
        .await
        .map_err(|e| bootstrap_err("connect to new database", &e))?;
    roles::prepare_database(&db, dbname)
        .await
        .map_err(|e| bootstrap_err("grant database privileges", &e))?;
    Ok(())
}

/// What `dalp status` can tell without starting anything.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub data_dir: PathBuf,
    pub initialised: bool,
    pub running: bool,
    pub server_pid: Option<i32>,
    pub dalp_pid: Option<i32>,
    pub port: Option<u16>,
    pub pg_major_version: Option<String>,
    pub ca_file: PathBuf,
}

/// Reads the state of the instance in `dir` without locking or changing it.
pub fn inspect(dir: &Path) -> InstanceInfo {
    let layout = Layout::new(dir);
    let pgdata = layout.pgdata();
    let server_pid = live_postmaster(&pgdata);
    let dalp_pid = std::fs::read_to_string(layout.lock_file())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| process::alive(*p) && server_pid.is_some());
    InstanceInfo {
        initialised: pgdata.join("PG_VERSION").exists(),
        running: server_pid.is_some(),
        server_pid,
        dalp_pid,
        port: layout.port(),
        pg_major_version: std::fs::read_to_string(pgdata.join("PG_VERSION"))
            .ok()
            .map(|s| s.trim().to_string()),
        ca_file: layout.ca_cert(),
        data_dir: layout.root().to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_bindable() {
        let (lo, hi) = ephemeral_ports();
        for _ in 0..20 {
            let p = free_port().unwrap();
            assert!(!(lo..=hi).contains(&p), "{p} is in {lo}..={hi}");
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
