//! Role passwords. They live in one JSON file with mode 0600 (written by `dalp-ops` for the
//! embedded cluster) or come from the environment; they never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// Password per login role name.
    pub roles: BTreeMap<String, String>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("roles", &self.roles.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read secrets file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("secrets file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("no password for role {role}: add it to the secrets file or set {env}")]
    Missing { role: String, env: String },
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Secrets, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| SecretsError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Name of the environment variable that overrides a role's password.
    pub fn env_var(role: &str) -> String {
        format!("DALP_PASSWORD_{}", role.to_ascii_uppercase())
    }

    /// The password for `role`: the environment variable wins over the file.
    pub fn password(&self, role: &str) -> Result<String, SecretsError> {
        let env = Self::env_var(role);
        if let Ok(v) = std::env::var(&env) {
            return Ok(v);
        }
        self.roles.get(role).cloned().ok_or(SecretsError::Missing {
            role: role.to_string(),
            env,
        })
    }
}
