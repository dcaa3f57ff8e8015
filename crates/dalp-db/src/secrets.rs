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
    /// A secrets manager to ask for roles the file does not have: a program and its
    /// arguments, `{role}` replaced by the role name; its trimmed stdout is the password
    /// (e.g. `["vault", "kv", "get", "-field=password", "secret/dalp/{role}"]`).
    #[serde(skip)]
    pub command: Option<Vec<String>>,
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
    #[error("the secrets command {program} gave no password for {role}: {message}")]
    Command {
        program: String,
        role: String,
        message: String,
    },
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
        if let Some(p) = self.roles.get(role) {
            return Ok(p.clone());
        }
        if let Some(cmd) = self.command.as_ref().filter(|c| !c.is_empty()) {
            return run_command(cmd, role);
        }
        Err(SecretsError::Missing {
            role: role.to_string(),
            env,
        })
    }
}

/// Asks the secrets manager command for `role`'s password. Its stderr is not shown (it
/// may echo what it was given); failures say which program failed and how.
fn run_command(cmd: &[String], role: &str) -> Result<String, SecretsError> {
    let args: Vec<String> = cmd.iter().map(|a| a.replace("{role}", role)).collect();
    let failed = |message: String| SecretsError::Command {
        program: args[0].clone(),
        role: role.to_string(),
        message,
    };
    let out = std::process::Command::new(&args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(format!("exited with {}", out.status)));
    }
    let password = String::from_utf8(out.stdout)
        .map_err(|_| failed("printed something that is not UTF-8".into()))?
        .trim_end_matches(['\n', '\r'])
        .to_string();
    if password.is_empty() {
        return Err(failed("printed no password".into()));
    }
    Ok(password)
}

#[cfg(test)]
mod command_tests {
    use super::*;

    #[test]
    fn a_secrets_manager_command_supplies_missing_passwords() {
        let mut s = Secrets::default();
        s.roles.insert("dalp_a".into(), "from-file".into());
        s.command = Some(vec![
            "sh".into(),
            "-c".into(),
            "echo \"pw-for-$0\"".into(),
            "{role}".into(),
        ]);
        assert_eq!(s.password("dalp_a").unwrap(), "from-file");
        assert_eq!(s.password("dalp_b").unwrap(), "pw-for-dalp_b");
        s.command = Some(vec!["false".into()]);
        let e = s.password("dalp_b").unwrap_err().to_string();
        assert!(e.contains("false") && e.contains("dalp_b"), "{e}");
        assert!(format!("{s:?}").find("from-file").is_none());
    }
}
