//! How to reach PostgreSQL: the `[database]` section of dalp's configuration (the rest of
//! the process configuration is `dalp_app::config`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::connect::{parse_host_port, ConnectOptions};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `host:port` entries; several mean an HA deployment and writes go to whichever
    /// accepts them. Default: `["127.0.0.1:5432"]`.
    pub hosts: Vec<String>,
    /// Database name. Default: `dalp`.
    pub name: String,
    /// `host:port` of a PgBouncer (transaction mode) in front of the primary. When set, the
    /// component pools go through it, while LISTEN connections (cache invalidation) still
    /// go directly to `hosts`. Default: none.
    pub pooler: Option<String>,
    /// CA bundle that server certificates must chain to (verify-full). Required for TCP hosts.
    /// Default: none.
    pub ca_file: Option<PathBuf>,
    /// JSON file with role passwords (`{"roles": {"dalp_identity_svc": "…"}}`), mode 0600.
    /// `DALP_PASSWORD_<ROLE>` variables override it. Default: none.
    pub secrets_file: Option<PathBuf>,
    /// Give up connecting to one host after this long. Default: 5000.
    pub connect_timeout_ms: u64,
    /// A secrets manager command asked for passwords the file and environment lack:
    /// program and arguments, `{role}` replaced by the role (see `Secrets::command`).
    /// Default: none.
    pub secrets_command: Option<Vec<String>>,
    /// Server-side `statement_timeout` for component connections. Default: 30000.
    pub statement_timeout_ms: u64,
    /// Connections per component pool. Default: 8.
    pub pool_max_size: usize,
    /// `host:port` of read replicas: reads that tolerate a replica (assets, indexed chain
    /// state) go to one within the lag bound, or to one that has replayed a client's
    /// consistency token (`x-dalp-consistency`). Default: none (every read on the primary).
    pub replicas: Vec<String>,
    /// How long a request waits for a free pooled connection. Default: 5000.
    pub pool_wait_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            hosts: vec!["127.0.0.1:5432".into()],
            name: "dalp".into(),
            pooler: None,
            ca_file: None,
            secrets_file: None,
            secrets_command: None,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 30_000,
            pool_max_size: 8,
            pool_wait_timeout_ms: 5_000,
            replicas: Vec::new(),
        }
    }
}

impl DatabaseConfig {
    /// Connection options for `user`, without a password.
    pub fn connect_options(&self, user: &str, application_name: &str) -> ConnectOptions {
        let db = self;
        ConnectOptions {
            hosts: db
                .hosts
                .iter()
                .map(|h| parse_host_port(h).expect("validated"))
                .collect(),
            dbname: db.name.clone(),
            user: user.to_string(),
            password: None,
            ca_file: db.ca_file.clone(),
            application_name: application_name.to_string(),
            connect_timeout: Duration::from_millis(db.connect_timeout_ms),
            statement_timeout: Some(Duration::from_millis(db.statement_timeout_ms)),
            read_write: db.hosts.len() > 1,
        }
    }

    /// The read replicas as (host, port).
    pub fn replica_hosts(&self) -> Vec<(String, u16)> {
        self.replicas
            .iter()
            .map(|h| parse_host_port(h).expect("validated"))
            .collect()
    }

    /// Options for `user` through the configured pooler, if any: the same database, CA and
    /// timeouts, one host, and no `options` startup parameter (PgBouncer refuses it).
    pub fn pooler_options(&self, user: &str, application_name: &str) -> Option<ConnectOptions> {
        let p = self.pooler.as_ref()?;
        let mut o = self.connect_options(user, application_name);
        o.hosts = vec![parse_host_port(p).expect("validated")];
        o.read_write = false;
        o.statement_timeout = None;
        Some(o)
    }
}
