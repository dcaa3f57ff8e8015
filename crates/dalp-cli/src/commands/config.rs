//! `dalp config check`.

use std::path::Path;
use std::process::ExitCode;

use dalp_app::config::Config;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (unknown keys, types, values) with the environment applied,
    /// and print the effective configuration without secrets.
    Check {
        /// The TOML file.
        #[arg(long, env = "DALP_CONFIG")]
        config: PathBuf,
    },
}

pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(path), std::env::vars())?;
    // The config holds paths to secrets, never secrets, so printing it is safe.
    println!("# {}: ok", path.display());
    println!("# effective configuration: the file, DALP_* environment overrides and defaults");
    print!("{}", config.to_toml());
    Ok(ExitCode::SUCCESS)
}
