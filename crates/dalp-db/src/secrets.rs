//! Role passwords. They live in one JSON file with mode 0600 (written by `dalp-ops` for the
//! embedded cluster) or come from the environment; they never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Writes `text` to `path` readable by its owner only (0600): into a temporary file beside
/// it, synced, then renamed, so a crash never leaves a half-written secret or key. Creates
/// missing parent directories.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

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
