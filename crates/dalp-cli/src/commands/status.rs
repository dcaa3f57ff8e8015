//! `dalp status`.

use std::process::ExitCode;

use dalp_app::catalog::MIGRATIONS;
use dalp_db::migrate::{self, SchemaStatus};
use dalp_ops::embedded::{inspect, InstanceInfo};
use serde::Serialize;

use crate::cli::TargetArgs;
use crate::target::connect_admin;

#[derive(Serialize)]
struct RoleInfo {
    name: String,
    login: bool,
    member_of: Vec<String>,
}

#[derive(Serialize)]
struct Status {
    /// The embedded instance, when acting on a data directory.
    instance: Option<InstanceInfo>,
    reachable: bool,
    server_version: Option<String>,
    schemas: Vec<SchemaStatus>,
    roles: Vec<RoleInfo>,
    /// Why the database could not be queried, when it could not.
    error: Option<String>,
}

pub async fn run(target: &TargetArgs, json: bool) -> anyhow::Result<ExitCode> {
    let instance = target
        .database_url
        .is_none()
        .then(|| inspect(&target.data_dir));
    let mut status = Status {
        instance,
        reachable: false,
        server_version: None,
        schemas: Vec::new(),
        roles: Vec::new(),
        error: None,
    };
    let try_db = status.instance.as_ref().map(|i| i.running).unwrap_or(true);
    if try_db {
        match query(target, &mut status).await {
            Ok(()) => status.reachable = true,
            Err(e) => status.error = Some(format!("{e:#}")),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    Ok(ExitCode::SUCCESS)
}

async fn query(target: &TargetArgs, status: &mut Status) -> anyhow::Result<()> {
    let client = connect_admin(target).await?;
    status.server_version = Some(client.query_one("SHOW server_version", &[]).await?.get(0));
    status.schemas = migrate::status(&client, &MIGRATIONS).await?;
    status.roles = client
        .query(
            "SELECT r.rolname::text, r.rolcanlogin,
                    coalesce(array_agg(g.rolname::text ORDER BY g.rolname) FILTER (WHERE g.rolname IS NOT NULL), '{}')
               FROM pg_roles r
               LEFT JOIN pg_auth_members m ON m.member = r.oid
               LEFT JOIN pg_roles g ON g.oid = m.roleid
              WHERE r.rolname LIKE 'dalp\\_%'
              GROUP BY 1, 2 ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| RoleInfo {
            name: r.get(0),
            login: r.get(1),
            member_of: r.get(2),
        })
        .collect();
    Ok(())
}

fn print_text(s: &Status) {
    if let Some(i) = &s.instance {
        println!("data dir      {}", i.data_dir.display());
        let state = match (i.initialised, i.running) {
            (false, _) => "not initialised (run `dalp up`)".to_string(),
            (true, false) => "stopped".to_string(),
            (true, true) => format!(
                "running (postgres pid {}{})",
                i.server_pid.unwrap_or_default(),
                i.dalp_pid
                    .map(|p| format!(", dalp pid {p}"))
                    .unwrap_or_default()
            ),
        };
        println!("cluster       {state}");
        if let Some(p) = i.port {
            println!("port          127.0.0.1:{p}");
        }
        if let Some(v) = &i.pg_major_version {
            println!("data version  PostgreSQL {v}");
        }
        println!("ca            {}", i.ca_file.display());
    }
    if let Some(v) = &s.server_version {
        println!("server        PostgreSQL {v}");
    }
    if let Some(e) = &s.error {
        println!("database      unreachable: {e}");
    }
    if !s.schemas.is_empty() {
        println!("schemas");
        for sc in &s.schemas {
            println!(
                "  {:16} version {} of {}{}",
                sc.schema,
                sc.applied_version,
                sc.latest_version,
                if sc.is_current() {
                    ""
                } else {
                    "  (pending: run `dalp migrate`)"
                }
            );
        }
    }
    if !s.roles.is_empty() {
        println!("roles");
        for r in &s.roles {
            println!(
                "  {:20} {}{}",
                r.name,
                if r.login { "login" } else { "nologin" },
                if r.member_of.is_empty() {
                    String::new()
                } else {
                    format!(", member of {}", r.member_of.join(", "))
                }
            );
        }
    }
}
