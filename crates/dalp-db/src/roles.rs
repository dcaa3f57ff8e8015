//! Creating dalp's roles and preparing a database for them. This needs a role with
//! CREATEROLE (the embedded cluster's superuser, or a managed service's admin user); after
//! it, migrations run as the unprivileged owner.

use tokio_postgres::Client;

use crate::component::{
    login_roles, Component, ADMIN_ROLE, MIGRATOR_ROLE, MONITOR_GROUP, OWNER_ROLE, PGAUDIT_ROLE,
};
use crate::secrets::{Secrets, SecretsError};
use crate::sql::{quote_ident, quote_literal};

#[derive(Debug, thiserror::Error)]
pub enum RolesError {
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("creating roles: {}", crate::connect::describe_error(.0))]
    Db(#[from] tokio_postgres::Error),
    /// An existing role has attributes dalp's roles must not have, and the connected role
    /// may not change them (only a superuser may touch SUPERUSER, REPLICATION, BYPASSRLS).
    #[error("role {role} has {attributes}, which a dalp role must not have, and {admin} may not remove them; ask the service's superuser (or the provider's console) to run: ALTER ROLE {role} {fix}")]
    Attributes {
        role: String,
        admin: String,
        attributes: String,
        fix: String,
    },
}

async fn role_exists(client: &Client, role: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await?
        .get(0))
}

/// What pgAudit's session log records for the reporting and audit-reading roles: their reads
/// too (no API sits in front of them), besides the cluster-wide classes.
pub const READER_PGAUDIT_LOG: &str = "read, write, ddl, role";

/// Creates `role` (LOGIN, no special attributes) if missing and sets its password, sent as
/// a SCRAM verifier. An existing role only gets LOGIN and the password: PostgreSQL refuses
/// any SUPERUSER/REPLICATION/BYPASSRLS clause to a non-superuser (as on managed services)
/// even when nothing would change, so the attributes are read back and only what differs
/// is changed, or reported when the connected role may not change it.
async fn ensure_login(client: &Client, role: &str, password: &str) -> Result<(), RolesError> {
    let verifier = quote_literal(&postgres_protocol::password::scram_sha_256(
        password.as_bytes(),
    ));
    let q = quote_ident(role);
    if !role_exists(client, role).await? {
        client
            .batch_execute(&format!(
                "CREATE ROLE {q} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {verifier}"
            ))
            .await?;
        return Ok(());
    }
    client
        .batch_execute(&format!("ALTER ROLE {q} WITH LOGIN PASSWORD {verifier}"))
        .await?;
    let row = client
        .query_one(
            "SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolreplication, r.rolbypassrls,
                    me.rolsuper, current_user::text
               FROM pg_roles r, pg_roles me
              WHERE r.rolname = $1 AND me.rolname = current_user",
            &[&role],
        )
        .await?;
    let wrong: Vec<&str> = [
        "SUPERUSER",
        "CREATEDB",
        "CREATEROLE",
        "REPLICATION",
        "BYPASSRLS",
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| row.get::<_, bool>(*i))
    .map(|(_, a)| a)
    .collect();
    if wrong.is_empty() {
        return Ok(());
    }
    let fix: Vec<String> = wrong.iter().map(|a| format!("NO{a}")).collect();
    let needs_superuser = wrong
        .iter()
        .any(|a| matches!(*a, "SUPERUSER" | "REPLICATION" | "BYPASSRLS"));
    if needs_superuser && !row.get::<_, bool>(5) {
        return Err(RolesError::Attributes {
            role: role.to_string(),
            admin: row.get(6),
            attributes: wrong.join(", "),
            fix: fix.join(" "),
        });
    }
    client
        .batch_execute(&format!("ALTER ROLE {q} WITH {}", fix.join(" ")))
        .await?;
    Ok(())
}

/// Sets pgAudit's session classes for `role`. pgaudit.log is a superuser setting: where the
/// connected role may not set it (a managed service's admin), the service's own pgAudit
/// configuration applies and this says so instead of failing.
async fn set_role_pgaudit(client: &Client, role: &str, classes: &str) -> Result<(), RolesError> {
    let sql = format!(
        "ALTER ROLE {} SET pgaudit.log = {}",
        quote_ident(role),
        quote_literal(classes)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::warn!(
                role,
                classes,
                "cannot set pgaudit.log for this role here ({}); set it with the provider's pgAudit configuration (e.g. RDS: rds_pgaudit role + pgaudit.log parameter group)",
                crate::connect::describe_error(&e)
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates the owner and login roles if missing and (re)sets each login role's password
/// from `secrets`. Passwords are sent as SCRAM verifiers computed here, so the plaintext
/// never reaches the server or its logs. Idempotent.
pub async fn ensure_roles(client: &Client, secrets: &Secrets) -> Result<(), RolesError> {
    for nologin in [OWNER_ROLE, PGAUDIT_ROLE] {
        if !role_exists(client, nologin).await? {
            client
                .batch_execute(&format!("CREATE ROLE {} NOLOGIN", quote_ident(nologin)))
                .await?;
        }
    }
    for role in login_roles() {
        ensure_login(client, role, &secrets.password(role)?).await?;
    }
    client
        .batch_execute(&format!(
            "GRANT {} TO {}",
            quote_ident(OWNER_ROLE),
            quote_ident(MIGRATOR_ROLE)
        ))
        .await?;
    client
        .batch_execute(&format!(
            "GRANT {} TO {}",
            MONITOR_GROUP,
            quote_ident(Component::Monitor.role())
        ))
        .await?;
    // Reporting and audit reads happen outside the API (and its request audit): pgAudit
    // logs them, so every access to dalp's data is on record.
    for c in [Component::Readonly, Component::Auditor] {
        set_role_pgaudit(client, c.role(), READER_PGAUDIT_LOG).await?;
    }
    // The administrator, when the secrets carry its password.
    if let Ok(password) = secrets.password(ADMIN_ROLE) {
        ensure_login(client, ADMIN_ROLE, &password).await?;
        client
            .batch_execute(&format!(
                "GRANT {} TO {}",
                quote_ident(OWNER_ROLE),
                quote_ident(ADMIN_ROLE)
            ))
            .await?;
        set_role_pgaudit(client, ADMIN_ROLE, "all").await?;
    }
    // Query analysis (`dalp db top|lint`) reads statistics of every role's statements; the
    // owner's `dalp_meta.replica_state()` reads the WAL receiver's state for replica routing.
    client
        .batch_execute(&format!(
            "GRANT pg_read_all_stats TO {}; GRANT pg_read_all_stats TO {}",
            quote_ident(MIGRATOR_ROLE),
            quote_ident(OWNER_ROLE)
        ))
        .await?;
    Ok(())
}

/// Database-level grants: only dalp's roles may connect, only the owner may create schemas,
/// and nobody may create objects in `public`. `client` must be connected to `dbname` as a
/// role that owns the database (or a superuser).
pub async fn prepare_database(client: &Client, dbname: &str) -> Result<(), RolesError> {
    let db = quote_ident(dbname);
    let mut sql = format!(
        "REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT CONNECT, CREATE ON DATABASE {db} TO {owner}; REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
        owner = quote_ident(OWNER_ROLE)
    );
    for role in login_roles() {
        sql.push_str(&format!(
            "GRANT CONNECT ON DATABASE {db} TO {};",
            quote_ident(role)
        ));
    }
    client.batch_execute(&sql).await?;
    // Statement statistics, where the server preloads the module (the embedded and HA
    // clusters do). Needs a superuser; elsewhere a DBA installs it.
    let preloaded: bool = client
        .query_one(
            "SELECT current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'",
            &[],
        )
        .await?
        .get(0);
    if preloaded {
        if let Err(e) = client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
        {
            tracing::warn!(error = %e, "pg_stat_statements not installed; `dalp db top` will say so");
        }
    }
    Ok(())
}

/// Generates a random password of `len` alphanumeric characters from the OS RNG.
pub fn generate_password(len: usize) -> String {
    use std::io::Read;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut out = String::with_capacity(len);
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom is readable");
    let mut buf = [0u8; 1];
    while out.len() < len {
        f.read_exact(&mut buf).expect("read /dev/urandom");
        // Rejection sampling keeps the distribution uniform.
        let limit = 256 - (256 % ALPHABET.len());
        if (buf[0] as usize) < limit {
            out.push(ALPHABET[buf[0] as usize % ALPHABET.len()] as char);
        }
    }
    out
}

/// Fresh secrets with a generated password for every login role.
pub fn generate_secrets() -> Secrets {
    Secrets {
        roles: login_roles()
            .chain(std::iter::once(ADMIN_ROLE))
            .map(|r| (r.to_string(), generate_password(32)))
            .collect(),
        command: None,
    }
}
