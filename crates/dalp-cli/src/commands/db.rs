//! `dalp db url`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dalp_db::component::login_roles;
use dalp_ops::Layout;

pub fn url(data_dir: &Path, role: &str) -> anyhow::Result<ExitCode> {
    if !login_roles().any(|r| r == role) {
        bail!(
            "unknown role `{role}`; login roles are: {}",
            login_roles().collect::<Vec<_>>().join(", ")
        );
    }
    let mut opts = Layout::new(data_dir)
        .connect_options(role)
        .with_context(|| format!("instance in {}", data_dir.display()))?;
    opts.application_name = "psql".into();
    println!("{}", opts.to_url());
    Ok(ExitCode::SUCCESS)
}
