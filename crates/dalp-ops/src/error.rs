//! Errors of operating processes, each saying what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("PostgreSQL binary {0} not found: install PostgreSQL 15 (apt-get install -y postgresql-15) or set DALP_PG_BIN to its bin directory")]
    MissingBinary(PathBuf),
    #[error("running as root but there is no `postgres` system user to run PostgreSQL as: install the postgresql-15 package, which creates it")]
    NoServerUser,
    #[error("the {user} system user cannot enter {path} (mode {mode:o}): PostgreSQL runs as {user} and needs every parent of the data directory to be traversable. Choose a --data-dir it can reach (e.g. under /var/lib or /tmp), or run `chmod o+x {path}`")]
    NotTraversable {
        path: PathBuf,
        user: String,
        mode: u32,
    },
    #[error("data directory {dir} is in use by a running dalp (pid {pid}); stop that one first (Ctrl-C in its terminal, or `kill {pid}`)")]
    InUse { dir: PathBuf, pid: String },
    #[error("a PostgreSQL server (pid {pid}) is still running on {pgdata} without a dalp in charge of it; stop it with `kill -INT {pid}` and try again")]
    OrphanServer { pgdata: PathBuf, pid: i32 },
    #[error("port {port} on {host} is already in use: choose another with {flag}, or stop whatever listens there")]
    PortInUse {
        port: u16,
        host: String,
        flag: &'static str,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed ({status}); output:\n{output}")]
    Initdb { status: String, output: String },
    #[error("PostgreSQL did not start: {reason}. Last lines of {log}:\n{tail}")]
    StartFailed {
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("generating TLS certificates: {0}")]
    Tls(#[from] rcgen::Error),
    #[error("{context}: {message}")]
    Bootstrap { context: String, message: String },
}

impl OpsError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OpsError {
        let context = context.into();
        move |source| OpsError::Io { context, source }
    }
}
