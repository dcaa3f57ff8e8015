//! The whole-process configuration of a serving dalp (database and replicas, API, keys,
//! maintenance), typed and layered: a TOML file, then `DALP_<SECTION>__<KEY>` environment
//! variables on top. The `[database]` section is `dalp_db::config::DatabaseConfig`, the
//! connection layer's own. Unknown keys are errors in both layers, so a typo never silently falls
//! back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use dalp_db::config::DatabaseConfig;
use dalp_db::connect::{parse_host_port, ConnectOptions};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How to reach PostgreSQL.
    pub database: DatabaseConfig,
    /// The HTTP API listener.
    pub api: ApiConfig,
    /// Key-encryption keys for PII.
    pub keys: KeysConfig,
    /// Background duties every serving process runs.
    pub maintenance: MaintenanceConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Seconds between partition maintenance rounds (create partitions ahead, drop those past
    /// retention). Several API processes may run: an advisory lock lets one do each round.
    /// The first round runs at start. Default: 3600.
    pub partition_interval_secs: u64,
    /// Months audit partitions are kept (the data-protection policy: 7 years). Default: 84.
    pub audit_retention_months: u32,
    /// Months indexed chain data is kept. Default: none (kept forever; re-readable from the
    /// chain).
    pub indexed_retention_months: Option<u32>,
    /// The data directory of a dalp instance or HA cluster whose pgBackRest repositories
    /// this process reports in `/metrics` (`dalp_backup_last_success_age_seconds`).
    /// Default: none (on a managed service, backups are the provider's).
    pub backup_dir: Option<PathBuf>,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            partition_interval_secs: 3600,
            audit_retention_months: 84,
            indexed_retention_months: None,
            backup_dir: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Directory of dalp's key files (created 0600 on first use): `kek.json`, the
    /// key-encryption keys for PII, and `audit-ed25519.json`, the audit chain's signing key.
    /// Default: none; `dalp serve` then refuses to start.
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the HTTP API binds. Default: `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes. Default: 65536.
    pub max_body_bytes: usize,
    /// Login attempts allowed per client address and email per minute. Default: 10.
    pub login_attempts_per_minute: u32,
    /// PEM certificate chain for serving the API over TLS (with `tls_key`). Default: none
    /// (plain HTTP, meant for loopback or behind a TLS-terminating proxy).
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert`. Default: none.
    pub tls_key: Option<std::path::PathBuf>,
    /// A client must send its whole request head within this; slower ones are dropped.
    /// Default: 10000.
    pub header_read_timeout_ms: u64,
    /// A request must be answered within this (503 otherwise); above the statements'
    /// `statement_timeout`, so a slow statement reports itself first. Default: 60000.
    pub request_timeout_ms: u64,
    /// Open client connections at most; more wait in the listen backlog. Default: 1024.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 << 10,
            login_attempts_per_minute: 10,
            tls_cert: None,
            tls_key: None,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 60_000,
            max_connections: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config value {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Prefix of environment variables that override config keys: `DALP_DATABASE__HOSTS`.
const ENV_PREFIX: &str = "DALP_";

impl Config {
    /// Loads the optional file, then overlays environment variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.display().to_string(),
                    message: e.message().to_string(),
                })?;
                (table, p.display().to_string())
            }
            None => (toml::Table::new(), "(defaults)".to_string()),
        };
        // The file alone must be valid, so its errors name the file rather than a variable.
        Config::deserialize(table.clone()).map_err(|e| ConfigError::Parse {
            path: origin,
            message: e.message().to_string(),
        })?;
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        for (var, raw) in env {
            let Some(key) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Only `SECTION__KEY` variables are config; `DALP_PASSWORD_*` and CLI variables
            // such as `DALP_DATA_DIR` are not.
            let Some((section, field)) = key.split_once("__") else {
                continue;
            };
            let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
            let value = parse_env_value(&raw);
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(section_table) = entry.as_table_mut() else {
                return Err(ConfigError::Env {
                    var,
                    message: format!("`{section}` is not a section"),
                });
            };
            section_table.insert(field, value);
            Config::deserialize(table.clone()).map_err(|e| ConfigError::Env {
                var: var.clone(),
                message: e.message().to_string(),
            })?;
        }
        let config = Config::deserialize(table).map_err(|e| ConfigError::Parse {
            path: "(merged)".into(),
            message: e.message().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: host syntax, non-zero sizes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let db = &self.database;
        if db.hosts.is_empty() {
            return Err(ConfigError::Invalid {
                field: "database.hosts",
                message: "at least one host:port is required".into(),
            });
        }
        for h in &db.hosts {
            parse_host_port(h).map_err(|message| ConfigError::Invalid {
                field: "database.hosts",
                message,
            })?;
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            return Err(ConfigError::Invalid {
                field: "api.tls_cert",
                message: "api.tls_cert and api.tls_key go together".into(),
            });
        }
        if let Some(p) = &db.pooler {
            parse_host_port(p).map_err(|message| ConfigError::Invalid {
                field: "database.pooler",
                message,
            })?;
        }
        for r in &db.replicas {
            parse_host_port(r).map_err(|message| ConfigError::Invalid {
                field: "database.replicas",
                message,
            })?;
        }
        if db.name.is_empty() {
            return Err(ConfigError::Invalid {
                field: "database.name",
                message: "must not be empty".into(),
            });
        }
        if db.pool_max_size == 0 {
            return Err(ConfigError::Invalid {
                field: "database.pool_max_size",
                message: "must be at least 1".into(),
            });
        }
        if db.connect_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                field: "database.connect_timeout_ms",
                message: "must be at least 1".into(),
            });
        }
        for (field, v) in [
            (
                "api.header_read_timeout_ms",
                self.api.header_read_timeout_ms,
            ),
            ("api.request_timeout_ms", self.api.request_timeout_ms),
            ("api.max_connections", self.api.max_connections as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be at least 1".into(),
                });
            }
        }
        let m = &self.maintenance;
        if m.partition_interval_secs == 0 {
            return Err(ConfigError::Invalid {
                field: "maintenance.partition_interval_secs",
                message: "must be at least 1".into(),
            });
        }
        for (field, months) in [
            (
                "maintenance.audit_retention_months",
                Some(m.audit_retention_months),
            ),
            (
                "maintenance.indexed_retention_months",
                m.indexed_retention_months,
            ),
        ] {
            if months.is_some_and(|n| !(1..=1200).contains(&n)) {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be 1 to 1200 months".into(),
                });
            }
        }
        Ok(())
    }

    /// Connection options for `user`, without a password.
    pub fn connect_options(&self, user: &str, application_name: &str) -> ConnectOptions {
        self.database.connect_options(user, application_name)
    }
}

impl Config {
    /// The read replicas as (host, port).
    pub fn replica_hosts(&self) -> Vec<(String, u16)> {
        self.database.replica_hosts()
    }

    /// The effective configuration (file, environment and defaults) as TOML, for
    /// `dalp config check`. It names secret files and commands, never secrets.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serializes as TOML")
    }

    /// Options for `user` through the configured pooler, if any.
    pub fn pooler_options(&self, user: &str, application_name: &str) -> Option<ConnectOptions> {
        self.database.pooler_options(user, application_name)
    }
}

/// Environment values are TOML when they parse as such (`8`, `["a:1","b:2"]`, `true`),
/// and plain strings otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_without_file() {
        let c = Config::load(None, vec![]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.database.pool_max_size, 8);
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_the_key() {
        let f = write("[database]\nhost = \"x\"\n");
        let err = Config::load(Some(f.path()), vec![]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `host`"), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let f = write("[databse]\nname = \"x\"\n");
        let msg = Config::load(Some(f.path()), vec![])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown field `databse`"), "{msg}");
    }

    #[test]
    fn env_overrides_file_and_unknown_env_key_is_an_error() {
        let f = write("[database]\nname = \"fromfile\"\npool_max_size = 3\n");
        let c = Config::load(
            Some(f.path()),
            vec![
                ("DALP_DATABASE__POOL_MAX_SIZE".into(), "12".into()),
                ("DALP_DATABASE__HOSTS".into(), r#"["a:1","b:2"]"#.into()),
                ("DALP_DATA_DIR".into(), "ignored".into()),
                ("DALP_PASSWORD_DALP_READONLY".into(), "ignored".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.database.name, "fromfile");
        assert_eq!(c.database.pool_max_size, 12);
        assert_eq!(c.database.hosts, vec!["a:1", "b:2"]);

        let err = Config::load(
            Some(f.path()),
            vec![("DALP_DATABASE__POOL_SIZE".into(), "12".into())],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("DALP_DATABASE__POOL_SIZE"), "{msg}");
        assert!(msg.contains("unknown field `pool_size`"), "{msg}");
    }

    #[test]
    fn wrong_type_and_invalid_values_are_errors() {
        let f = write("[database]\npool_max_size = \"many\"\n");
        assert!(Config::load(Some(f.path()), vec![]).is_err());
        let f = write("[database]\npool_max_size = 0\n");
        let msg = Config::load(Some(f.path()), vec![])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("database.pool_max_size"), "{msg}");
        let f = write("[database]\nhosts = [\"nohostport\"]\n");
        let msg = Config::load(Some(f.path()), vec![])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("database.hosts"), "{msg}");
    }
}
