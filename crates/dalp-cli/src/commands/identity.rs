//! `dalp users create-admin` and `dalp keys rotate`: the identity store, driven from the
//! command line as the identity service role.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dalp_app::config::Config;
use dalp_db::{Component, ComponentPools, MIGRATOR_ROLE};
use dalp_identity::crypto::FileKeyProvider;
use dalp_identity::store::NewUser;
use dalp_identity::types::{Email, Password, PlatformRole};
use dalp_identity::{IdentityStore, RequestContext};
use dalp_ops::Layout;

use crate::cli::InstanceArgs;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a platform administrator (role `admin`) so a fresh instance can be used at once.
    /// The password is read from standard input when it is not a terminal, else prompted twice.
    /// The admin must enrol TOTP at first login (POST /api/v1/mfa/totp).
    CreateAdmin {
        #[command(flatten)]
        instance: InstanceArgs,
        /// The administrator's email address.
        #[arg(long)]
        email: String,
        /// Display name [default: the part of the email before @].
        #[arg(long)]
        name: Option<String>,
    },
}

/// The component pools and keys directory of the instance: the embedded one in
/// `--data-dir`, or the external cluster of `--config`.
pub fn instance_pools(
    instance: &InstanceArgs,
) -> anyhow::Result<(ComponentPools, std::path::PathBuf)> {
    Ok(match &instance.config {
        Some(path) => {
            let config = Config::load(Some(path), std::env::vars())?;
            let pools = super::serve::config_pools(&config, 2)?;
            (pools, super::serve::config_keys_dir(&config)?.to_path_buf())
        }
        None => {
            let layout = Layout::new(&instance.data_dir);
            let base = layout
                .connect_options(MIGRATOR_ROLE)
                .with_context(|| format!("instance in {}", instance.data_dir.display()))?;
            let secrets = dalp_db::Secrets::load(&layout.secrets_file())?;
            let pools = ComponentPools::build(&base, &secrets, 2, Duration::from_secs(5))?;
            (pools, layout.keys_dir())
        }
    })
}

/// The identity store of the instance, without a cache (the CLI is short-lived).
fn store(instance: &InstanceArgs) -> anyhow::Result<IdentityStore> {
    let (pools, keys_dir) = instance_pools(instance)?;
    let keys = Arc::new(FileKeyProvider::open_or_create(
        &keys_dir.join(dalp_app::keys::KEK_FILE),
    )?);
    Ok(IdentityStore::new(
        pools.get(Component::Identity).clone(),
        keys,
        dalp_db::cache::InvalidatingCache::new(1),
    ))
}

fn cli_context() -> RequestContext {
    RequestContext {
        actor: "service:dalp-cli".into(),
        ..Default::default()
    }
}

fn read_password() -> anyhow::Result<Password> {
    let raw = super::prompt::read_secret("password (12+ characters): ", true, "password")?;
    Ok(Password::parse(&raw)?)
}

pub async fn create_admin(
    instance: &InstanceArgs,
    email: &str,
    name: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let email = Email::parse(email)?;
    let password = read_password()?;
    let name = name.map(str::to_string).unwrap_or_else(|| {
        email
            .as_str()
            .split('@')
            .next()
            .unwrap_or("admin")
            .to_string()
    });
    let store = store(instance)?;
    let user = store
        .create_user(
            &cli_context(),
            NewUser {
                email,
                name,
                password: Some(password),
                wallet_address: None,
                roles: vec![PlatformRole::Admin],
            },
        )
        .await
        .context("create the administrator")?;
    println!("created admin {} ({})", user.email, user.id);
    println!("log in with POST /api/v1/auth/login, then enrol TOTP with POST /api/v1/mfa/totp");
    Ok(ExitCode::SUCCESS)
}

pub async fn rotate_keys(instance: &InstanceArgs) -> anyhow::Result<ExitCode> {
    let store = store(instance)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("re-wrapping data keys {bar:30} {pos}/{len}")
            .expect("valid template"),
    );
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = store
        .rotate_keys(&cli_context(), &mut progress)
        .await
        .context("rotate keys")?;
    bar.finish_and_clear();
    println!(
        "active key-encryption key is now {}; {} data key(s) re-wrapped",
        report.active_kek, report.rewrapped
    );
    Ok(ExitCode::SUCCESS)
}
