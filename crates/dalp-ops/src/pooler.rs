//! PgBouncer in front of a dalp cluster: transaction pooling, one pool per component role
//! (PgBouncer keeps a pool per database × user), SCRAM on both sides and TLS on both sides
//! (clients must use TLS; PgBouncer verifies the server's certificate, verify-full).
//!
//! Authentication needs no plaintext password on disk: the auth file holds each role's
//! SCRAM verifier as PostgreSQL stores it, and PgBouncer reuses the keys of the client's
//! SCRAM exchange to log into the server.
//!
//! Beside the server (the embedded instance) it connects over the server's Unix socket: no
//! second TLS hop, and the socket (mode 0700 in a 0700 directory) is reachable only by the
//! server's OS user, which PgBouncer runs as; SCRAM still applies there. PgBouncer is
//! single-threaded, so `processes` copies share the listening port with `so_reuseport` (the
//! kernel spreads new client connections over them); each has its own server pool.
//!
//! Layout under the pooler directory: `pgbouncer-N.ini` per process, `userlist.txt` (0600),
//! `pgbouncer.log` (shared), `pgbouncer-N.pid`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dalp_db::connect::ConnectOptions;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::embedded::free_port;
use crate::error::OpsError;
use crate::pki;
use crate::process::{self, ServerUser};

const PGBOUNCER_BIN: &str = "/usr/sbin/pgbouncer";

/// What to run PgBouncer with.
#[derive(Debug, Clone)]
pub struct PoolerSpec {
    /// Directory for the pooler's configuration, auth file and log.
    pub dir: PathBuf,
    /// Directory with the cluster's `ca.crt`, `server.crt`, `server.key` (the server
    /// certificate is valid for 127.0.0.1, so PgBouncer presents it to clients too).
    pub tls_dir: PathBuf,
    /// The PostgreSQL server to pool (the primary).
    pub server_port: u16,
    /// The server's Unix socket directory when it runs on this machine: server
    /// connections use it instead of TCP + TLS.
    pub server_socket_dir: Option<PathBuf>,
    /// PgBouncer processes sharing the port (`so_reuseport`); 0: one per CPU.
    pub processes: u32,
    /// Port to listen on (127.0.0.1); default: a free one.
    pub port: Option<u16>,
    /// Server connections per database × role (per process).
    pub pool_size: u32,
    /// Client connections accepted in all.
    pub max_client_conn: u32,
    /// `(role, SCRAM verifier)` of every role that may log in through the pooler.
    pub users: Vec<(String, String)>,
}

impl PoolerSpec {
    pub fn validate(&self) -> Result<(), OpsError> {
        if self.pool_size == 0 || self.pool_size > 1000 {
            return Err(OpsError::Bootstrap {
                context: "pooler options".into(),
                message: format!("--pool-size {} must be 1 to 1000", self.pool_size),
            });
        }
        if self.max_client_conn < self.pool_size {
            return Err(OpsError::Bootstrap {
                context: "pooler options".into(),
                message: "--max-client-conn must be at least --pool-size".into(),
            });
        }
        if self.processes > 64 {
            return Err(OpsError::Bootstrap {
                context: "pooler options".into(),
                message: format!("--processes {} must be at most 64", self.processes),
            });
        }
        if self.users.is_empty() {
            return Err(OpsError::Bootstrap {
                context: "pooler options".into(),
                message: "no roles to authenticate".into(),
            });
        }
        for (role, verifier) in &self.users {
            if !verifier.starts_with("SCRAM-SHA-256$") {
                return Err(OpsError::Bootstrap {
                    context: format!("role {role}"),
                    message: "its password is not stored as SCRAM-SHA-256; reset it with `dalp roles create`".into(),
                });
            }
        }
        Ok(())
    }
}

/// Reads the SCRAM verifiers of `roles` from `pg_authid`, connecting with `su` (a superuser,
/// e.g. over the local socket).
pub async fn scram_verifiers(
    su: &ConnectOptions,
    roles: &[&str],
) -> Result<Vec<(String, String)>, OpsError> {
    let fail = |e: &dyn std::fmt::Display| OpsError::Bootstrap {
        context: "read role verifiers".into(),
        message: format!("{e} (is the server running?)"),
    };
    let client = su.connect().await.map_err(|e| fail(&e))?;
    let names: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    let rows = client
        .query(
            "SELECT rolname::text, rolpassword FROM pg_authid WHERE rolname = ANY($1) AND rolcanlogin ORDER BY 1",
            &[&names],
        )
        .await
        .map_err(|e| fail(&e))?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.get::<_, String>(0), r.get::<_, Option<String>>(1)?)))
        .collect())
}

/// Makes the PgBouncer processes running from `dir` (their pid files) re-read their
/// configuration and TLS files. Returns whether any was running.
pub fn reload_if_running(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut any = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("pgbouncer") && name.ends_with(".pid")) {
            continue;
        }
        let pid = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|p| process::alive(*p));
        if let Some(pid) = pid {
            any |= kill(Pid::from_raw(pid), Signal::SIGHUP).is_ok();
        }
    }
    any
}

/// How many PgBouncer processes `processes` (0: one per CPU) means.
fn process_count(processes: u32) -> usize {
    match processes {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    }
}

/// Running PgBouncer processes; stopped when dropped.
pub struct Pooler {
    dir: PathBuf,
    port: u16,
    spec: PoolerSpec,
    user: ServerUser,
    children: Mutex<Vec<Child>>,
    /// The server the configuration points at: `(socket dir or None for TCP, port)`.
    server: Mutex<(Option<PathBuf>, u16)>,
}

fn ini_quote(s: &str) -> String {
    // pgbouncer.ini values are plain; our paths come from our own layout.
    s.replace(['\n', '\r'], "")
}

impl Pooler {
    /// Writes the configuration and starts PgBouncer (as the `postgres` user when root),
    /// waiting until it accepts connections.
    pub async fn start(spec: PoolerSpec) -> Result<Pooler, OpsError> {
        spec.validate()?;
        if !Path::new(PGBOUNCER_BIN).exists() {
            return Err(OpsError::Bootstrap {
                context: format!("{PGBOUNCER_BIN} not found"),
                message: "install Debian's pgbouncer package (scripts/deps.sh does)".into(),
            });
        }
        let user = ServerUser::resolve()?;
        std::fs::create_dir_all(&spec.dir)
            .map_err(OpsError::io(format!("create {}", spec.dir.display())))?;
        std::fs::set_permissions(&spec.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(OpsError::io("chmod pooler dir"))?;
        user.chown(&spec.dir)?;
        let port = match spec.port {
            Some(p) if !crate::embedded::port_is_free(p) => {
                return Err(OpsError::PortInUse {
                    port: p,
                    host: "127.0.0.1".into(),
                    flag: "--port",
                })
            }
            Some(p) => p,
            None => free_port()?,
        };
        let server = (spec.server_socket_dir.clone(), spec.server_port);
        let pooler = Pooler {
            dir: spec.dir.clone(),
            port,
            spec,
            user,
            children: Mutex::new(Vec::new()),
            server: Mutex::new(server),
        };
        pooler.write_config()?;
        for i in 0..process_count(pooler.spec.processes) {
            pooler.spawn(i)?;
        }
        pooler.wait_listening(Duration::from_secs(20)).await?;
        Ok(pooler)
    }

    fn ini(&self, i: usize) -> PathBuf {
        self.dir.join(format!("pgbouncer-{i}.ini"))
    }

    fn spawn(&self, i: usize) -> Result<(), OpsError> {
        let log = self.dir.join("pgbouncer.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(OpsError::io(format!("open {}", log.display())))?;
        self.user.chown(&log)?;
        let err = out.try_clone().map_err(OpsError::io("open log"))?;
        let mut cmd = Command::new(PGBOUNCER_BIN);
        // Every client and server connection is a file descriptor: raise the soft limit to
        // the hard one so max_client_conn is reachable.
        // SAFETY: getrlimit/setrlimit are async-signal-safe and touch only the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let mut l = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
                    l.rlim_cur = l.rlim_max;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &l);
                }
                Ok(())
            });
        }
        cmd.arg(self.ini(i))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.user.configure(&mut cmd);
        let child = process::spawn(cmd).map_err(OpsError::io("start pgbouncer"))?;
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The first process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.pids().first().copied()
    }

    /// Every PgBouncer process's pid.
    pub fn pids(&self) -> Vec<u32> {
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.id())
            .collect()
    }

    /// `base` (role, password, CA, database) pointed at the pooler instead of the server.
    /// Connections through it carry no `options` startup parameter (PgBouncer refuses it).
    pub fn client_options(&self, base: &ConnectOptions) -> ConnectOptions {
        let mut o = base.clone();
        o.hosts = vec![("127.0.0.1".into(), self.port)];
        o.read_write = false;
        o.statement_timeout = None;
        o
    }

    fn write_config(&self) -> Result<(), OpsError> {
        let s = &self.spec;
        let (socket_dir, server_port) = self
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let server_host = match &socket_dir {
            Some(d) => ini_quote(&d.display().to_string()),
            None => "127.0.0.1".into(),
        };
        let mut users = String::new();
        for (role, verifier) in &s.users {
            users.push_str(&format!(
                "\"{}\" \"{}\"\n",
                role.replace('"', "\"\""),
                verifier.replace('"', "\"\"")
            ));
        }
        let userlist = self.dir.join("userlist.txt");
        pki::write_private(&userlist, &users)?;
        self.user.chown(&userlist)?;
        let tls = |f: &str| ini_quote(&s.tls_dir.join(f).display().to_string());
        for i in 0..process_count(s.processes) {
            let ini = format!(
                "; Written by dalp; rewritten at every start and on a leader change.\n\
             [databases]\n\
             * = host={server_host} port={server_port}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             ; every process listens on the port; the kernel spreads connections\n\
             so_reuseport = 1\n\
             pkt_buf = 16384\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = {maxc}\n\
             ; clients: TLS required, TLS 1.2 or newer\n\
             client_tls_sslmode = require\n\
             client_tls_cert_file = {cert}\n\
             client_tls_key_file = {key}\n\
             client_tls_protocols = secure\n\
             ; servers: TLS with full certificate verification over TCP (a Unix socket\n\
             ; to a server on this machine carries no TLS)\n\
             server_tls_sslmode = verify-full\n\
             server_tls_ca_file = {ca}\n\
             server_tls_protocols = secure\n\
             ignore_startup_parameters = extra_float_digits\n\
             server_reset_query = DISCARD ALL\n\
             server_check_delay = 5\n\
             server_connect_timeout = 5\n\
             server_login_retry = 1\n\
             query_wait_timeout = 30\n\
             logfile = {log}\n\
             pidfile = {pid}\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
                port = self.port,
                userlist = ini_quote(&userlist.display().to_string()),
                pool = s.pool_size,
                maxc = s.max_client_conn,
                cert = tls(pki::SERVER_CERT),
                key = tls(pki::SERVER_KEY),
                ca = tls(pki::CA_CERT),
                log = ini_quote(&self.dir.join("pgbouncer.log").display().to_string()),
                pid = ini_quote(
                    &self
                        .dir
                        .join(format!("pgbouncer-{i}.pid"))
                        .display()
                        .to_string()
                ),
            );
            let path = self.ini(i);
            std::fs::write(&path, ini)
                .map_err(OpsError::io(format!("write {}", path.display())))?;
            self.user.chown(&path)?;
        }
        Ok(())
    }

    /// Points the pooler at another server over TCP (after a failover) and reloads every
    /// process: new server connections go there; connections to the old one are closed as
    /// they are released.
    pub fn retarget(&self, server_port: u16) -> Result<(), OpsError> {
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = (None, server_port);
        self.write_config()?;
        for pid in self.pids() {
            kill(Pid::from_raw(pid as i32), Signal::SIGHUP)
                .map_err(|e| OpsError::io("reload pgbouncer")(e.into()))?;
        }
        Ok(())
    }

    /// Keeps the pooler pointed at the HA cluster's leader: polls Patroni every `every` and
    /// retargets on a change. Runs until the future is dropped.
    pub async fn follow_leader(&self, cluster: &crate::HaCluster, every: Duration) {
        let mut current = self.spec.server_port;
        loop {
            tokio::time::sleep(every).await;
            let Ok(leader) = cluster.leader().await else {
                continue;
            };
            let Some(port) = cluster.pg_port(&leader) else {
                continue;
            };
            if port != current {
                match self.retarget(port) {
                    Ok(()) => {
                        tracing::warn!(leader = %leader, port, "leader changed; the pooler now sends new server connections there");
                        eprintln!("leader is now {leader} (127.0.0.1:{port}); pooler retargeted");
                        current = port;
                    }
                    Err(e) => tracing::error!(error = %e, "retargeting the pooler failed"),
                }
            }
        }
    }

    async fn wait_listening(&self, timeout: Duration) -> Result<(), OpsError> {
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            let exited = self
                .children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter_mut()
                .find_map(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(OpsError::StartFailed {
                    reason: match exited {
                        Some(s) => format!("pgbouncer exited ({s})"),
                        None => format!("pgbouncer not listening after {timeout:?}"),
                    },
                    log: self.dir.join("pgbouncer.log"),
                    tail: process::log_tail(&self.dir.join("pgbouncer.log"), 10),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every PgBouncer process (SIGTERM: immediate shutdown, clients are
    /// disconnected).
    pub fn stop(&self) {
        let children: Vec<Child> =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let _ = process::stop_child(&mut child, Signal::SIGTERM, Duration::from_secs(10));
        }
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        self.stop();
    }
}
