//! `dalp config check`.

use std::path::Path;
use std::process::ExitCode;

use dalp_app::config::Config;

pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(path), std::env::vars())?;
    // The config holds paths to secrets, never secrets, so printing it is safe.
    println!("# {}: ok", path.display());
    println!("# effective configuration: the file, DALP_* environment overrides and defaults");
    print!("{}", config.to_toml());
    Ok(ExitCode::SUCCESS)
}
