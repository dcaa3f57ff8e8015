//! `dalp keys export`: the key bundle a disaster restore needs (dalp_ops::keybundle), and
//! the passphrase both ends ask for.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

// ---- command line ------------------------------------------------------------------

use crate::cli::InstanceArgs;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a new key-encryption key, make it active and re-wrap every data key under it.
    /// Records stay readable throughout; the old key stays in the key file.
    Rotate {
        #[command(flatten)]
        instance: InstanceArgs,
    },
    /// Seal everything a restore needs besides the backup repository into one file under a
    /// passphrase (Argon2id + AES-256-GCM): role passwords, PII key-encryption keys, audit
    /// keys and witness, the repositories' cipher passphrase, the TLS CA and certificate,
    /// the backup policy. Keep it apart from the repository; `dalp restore --keys` uses it
    /// when the instance is lost. Export again after `keys rotate`, `audit rotate-key` or
    /// `tls rotate`.
    Export {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Where to write the bundle (created 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// File holding the passphrase (at least 12 characters) [default:
        /// DALP_KEYS_PASSPHRASE, else one line from stdin].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

/// The key bundle's passphrase: the first line of `file`, else `DALP_KEYS_PASSPHRASE`, else
/// a prompt on a terminal (twice when `confirm`), else one line from stdin.
pub fn passphrase(file: Option<&Path>, confirm: bool) -> anyhow::Result<String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("read the passphrase file {}", f.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    if let Ok(p) = std::env::var("DALP_KEYS_PASSPHRASE") {
        return Ok(p);
    }
    super::prompt::read_secret(
        "key bundle passphrase (12+ characters): ",
        confirm,
        "passphrase",
    )
}

pub fn export(
    data_dir: &Path,
    out: &Path,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let pass = passphrase(passphrase_file, true)?;
    let (bundle, names) = dalp_ops::keybundle::export(data_dir, &pass)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("create {} (it must not exist yet)", out.display()))?;
    std::io::Write::write_all(&mut f, &bundle)
        .with_context(|| format!("write {}", out.display()))?;
    f.sync_all()?;
    println!(
        "key bundle written to {} ({} files: {}); keep it apart from the backup repository, with its passphrase",
        out.display(),
        names.len(),
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
