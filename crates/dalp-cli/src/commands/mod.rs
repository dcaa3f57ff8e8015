//! One module per verb; each returns the process exit code.

pub(crate) mod admin;
pub(crate) mod audit;
pub(crate) mod backup;
pub(crate) mod cluster;
pub(crate) mod config;
pub(crate) mod db;
pub mod demo;
mod doctor;
pub(crate) mod identity;
pub(crate) mod index;
pub(crate) mod keys;
mod lifecycle;
pub(crate) mod maintenance;
mod migrate;
pub(crate) mod node;
pub(crate) mod pool;
mod prompt;
pub(crate) mod roles;
mod serve;
mod status;
pub(crate) mod up;
pub(crate) mod workflows;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use audit::AuditCommand;
use config::ConfigCommand;
use db::DbCommand;
use identity::UsersCommand;
use keys::KeysCommand;
use roles::RolesCommand;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Status { target, json } => status::run(&target, json).await,
        Command::Migrate { target, dry_run } => migrate::run(&target, dry_run).await,
        Command::Db {
            command:
                DbCommand::Url {
                    data_dir,
                    role,
                    port,
                },
        } => db::url(&data_dir, &role, port),
        Command::Db {
            command:
                DbCommand::Top {
                    target,
                    by,
                    limit,
                    component,
                    json,
                },
        } => db::top(&target, &by, limit, component.as_deref(), json).await,
        Command::Db {
            command:
                DbCommand::Explain {
                    target,
                    component,
                    by,
                    limit,
                },
        } => db::explain(&target, &component, &by, limit).await,
        Command::Db {
            command:
                DbCommand::Lint {
                    target,
                    fail_on,
                    json,
                },
        } => db::lint(&target, &fail_on, json).await,
        Command::Roles {
            command: RolesCommand::Check { target, json },
        } => roles::check(&target, json).await,
        Command::Roles {
            command:
                RolesCommand::Create {
                    database_url,
                    secrets_file,
                },
        } => roles::create(&database_url, &secrets_file).await,
        Command::Config {
            command: ConfigCommand::Check { config },
        } => config::check(&config),
        Command::Serve { config } => serve::run(&config).await,
        Command::Openapi => {
            use std::io::Write;
            // A closed pipe (`dalp openapi | head`) is the reader's choice, not an error.
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                serde_json::to_string_pretty(dalp_api::openapi_document())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster { command } => cluster::run(command).await,
        Command::Node { command } => node::run(command).await,
        Command::Pool { command } => pool::run(command).await,
        Command::Admin { command } => admin::run(command).await,
        Command::Tls {
            command: admin::TlsCommand::Rotate { data_dir },
        } => admin::rotate_tls(&data_dir).await,
        Command::Backup { command } => backup::run(command).await,
        Command::Restore(args) => backup::restore(args).await,
        Command::Doctor {
            target,
            cert,
            warn_days,
            managed,
            json,
        } => doctor::run(&target, &cert, warn_days, managed, json).await,
        Command::Workflows { command } => workflows::run(command).await,
        Command::Index { command } => index::run(command).await,
        Command::Audit {
            command:
                AuditCommand::Verify {
                    target,
                    key,
                    checkpoint,
                    from,
                    to,
                    json,
                },
        } => {
            audit::verify(
                &target,
                &key,
                checkpoint.as_deref(),
                from.as_deref(),
                to.as_deref(),
                json,
            )
            .await
        }
        Command::Audit {
            command: AuditCommand::Checkpoint { target, out },
        } => audit::checkpoint(&target, out.as_deref()).await,
        Command::Audit {
            command: AuditCommand::RotateKey { instance },
        } => audit::rotate_key(&instance).await,
        Command::Audit {
            command:
                AuditCommand::Export {
                    target,
                    format,
                    since,
                    to,
                    siem,
                },
        } => audit::export(&target, &format, since.as_deref(), to.as_deref(), &siem).await,
        Command::Audit {
            command:
                AuditCommand::Forward {
                    target,
                    to,
                    siem,
                    name,
                    format,
                    batch,
                    settle_ms,
                    pgaudit_logs,
                },
        } => {
            audit::forward(
                &target,
                &to,
                &siem,
                audit::ForwardOptions {
                    name,
                    format,
                    batch,
                    settle: std::time::Duration::from_millis(settle_ms),
                    pgaudit_logs,
                },
            )
            .await
        }
        Command::Partitions {
            target,
            apply,
            retention,
            json,
        } => audit::partitions(&target, apply, retention.retention(), json).await,
        Command::Users {
            command:
                UsersCommand::CreateAdmin {
                    instance,
                    email,
                    name,
                },
        } => identity::create_admin(&instance, &email, name.as_deref()).await,
        Command::Keys {
            command: KeysCommand::Rotate { instance },
        } => identity::rotate_keys(&instance).await,
        Command::Keys {
            command:
                KeysCommand::Export {
                    data_dir,
                    out,
                    passphrase_file,
                },
        } => keys::export(&data_dir, &out, passphrase_file.as_deref()),
    }
}
