//! `dalp admin cert issue|revoke|list` and `dalp admin psql`: two-factor administrative
//! access (client certificate + password) as `dalp_admin`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use dalp_db::component::ADMIN_ROLE;
use dalp_ops::{pki, HaCluster, Layout};

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Client certificates for `dalp_admin`.
    Cert {
        #[command(subcommand)]
        command: AdminCertCommand,
    },
    /// Open psql as `dalp_admin` with a client certificate; psql asks for the password.
    /// Every statement of the session is audited.
    Psql {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// The certificate `dalp admin cert issue` wrote.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key.
        #[arg(long)]
        key: PathBuf,
        /// Extra arguments for psql (after --), e.g. -- -c "select 1".
        #[arg(last = true)]
        psql_args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCertCommand {
    /// Issue a client certificate (CN dalp_admin, OU NAME) signed by the cluster's CA. The
    /// private key is written 0600 to --out and not kept by dalp.
    Issue {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Who it is for (recorded in the certificate and the issue log).
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. 8h, 30m, 1d (at most 7d).
        #[arg(long, default_value = "8h")]
        ttl: String,
        /// Directory for NAME.crt and NAME.key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke a certificate: it goes on the CRL and the server reloads it at once.
    Revoke {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Serial number (hex) as `dalp admin cert list` shows it.
        #[arg(long)]
        serial: String,
    },
    /// Certificates issued so far, with expiry and revocation.
    List {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Replace the server certificate and key with new ones from the same CA and make every
    /// running server (and a running pooler) load them; connections stay up and clients
    /// keep verifying against the unchanged CA.
    Rotate {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
    },
}

/// Parses `30m`, `8h`, `1d`; at most seven days.
fn parse_ttl(s: &str) -> anyhow::Result<chrono::Duration> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n
        .parse()
        .with_context(|| format!("--ttl `{s}`: use a number with m, h or d, e.g. 8h"))?;
    let d = match unit {
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => bail!("--ttl `{s}`: the unit must be m, h or d"),
    };
    if d <= chrono::Duration::zero() || d > chrono::Duration::days(7) {
        bail!("--ttl `{s}`: administrative certificates live more than 0 and at most 7 days");
    }
    Ok(d)
}

fn tls_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("tls");
    if !dir.join(pki::CA_KEY).exists() {
        bail!(
            "no cluster CA in {} (start the instance once with `dalp up` or `dalp cluster up`)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Makes every running server of the instance read its configuration (and CRL) again.
async fn reload(data_dir: &Path) -> anyhow::Result<()> {
    let targets = if dalp_ops::HaCluster::is_cluster_dir(data_dir) {
        let c = HaCluster::open(data_dir)?;
        c.nodes()
            .iter()
            .filter(|n| c.postmaster_pid(&n.name).is_some())
            .map(|n| c.superuser_options(&n.name, "postgres"))
            .collect()
    } else {
        vec![Layout::new(data_dir).superuser_options("postgres")?]
    };
    for t in targets {
        let c = t
            .connect()
            .await
            .context("connect over the local socket to reload (is the instance running?)")?;
        c.batch_execute("SELECT pg_reload_conf()").await?;
    }
    Ok(())
}

/// `dalp tls rotate`: a new server certificate from the same CA, loaded by every running
/// server and by a running pooler.
pub async fn rotate_tls(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let dir = tls_dir(data_dir)?;
    pki::rotate_server(&dir, &dalp_ops::process::ServerUser::resolve()?)?;
    reload(data_dir)
        .await
        .context("the new certificate is in place, but a server did not reload")?;
    // A pooler started by `dalp pool up` presents the same certificate to its clients.
    if dalp_ops::pooler::reload_if_running(&data_dir.join("pgbouncer")) {
        eprintln!("the running pooler reloaded its certificate too");
    }
    let pem = std::fs::read(dir.join(pki::SERVER_CERT))?;
    let until = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .next()
        .and_then(|p| p.ok())
        .and_then(|p| {
            p.parse_x509()
                .ok()
                .map(|c| c.validity().not_after.to_string())
        })
        .unwrap_or_default();
    println!(
        "rotated the server certificate in {} (valid until {until}); servers reloaded it",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn run(command: AdminCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::Cert {
            command:
                AdminCertCommand::Issue {
                    data_dir,
                    name,
                    ttl,
                    out,
                },
        } => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
            {
                bail!("--name `{name}`: use letters, digits and . _ - @ only");
            }
            let ttl = parse_ttl(&ttl)?;
            let dir = tls_dir(&data_dir)?;
            let (issued, cert, key) = pki::issue_client(&dir, ADMIN_ROLE, &name, ttl)?;
            std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
            let cert_path = out.join(format!("{name}.crt"));
            let key_path = out.join(format!("{name}.key"));
            std::fs::write(&cert_path, cert)
                .with_context(|| format!("write {}", cert_path.display()))?;
            dalp_db::secrets::write_private(&key_path, &key)
                .with_context(|| format!("write {}", key_path.display()))?;
            println!(
                "issued {} to {} (role {}), serial {}, valid until {}",
                cert_path.display(),
                issued.name,
                issued.role,
                issued.serial,
                issued.not_after.to_rfc3339()
            );
            println!(
                "  key {} (0600; dalp keeps no copy)   use: dalp admin psql --cert {} --key {}",
                key_path.display(),
                cert_path.display(),
                key_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Cert {
            command: AdminCertCommand::Revoke { data_dir, serial },
        } => {
            let dir = tls_dir(&data_dir)?;
            let r = pki::revoke(&dir, &serial)?;
            match reload(&data_dir).await {
                Ok(()) => println!(
                    "revoked {} (issued to {}); the server refuses it from now on",
                    r.serial, r.name
                ),
                Err(e) => println!(
                    "revoked {} (issued to {}) in {}; the server reads it at its next start ({e:#})",
                    r.serial,
                    r.name,
                    dir.join(pki::CRL).display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Cert {
            command: AdminCertCommand::List { data_dir, json },
        } => {
            let list = pki::issued(&tls_dir(&data_dir)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let now = chrono::Utc::now();
                for i in list {
                    let state = match i.revoked_at {
                        Some(t) => format!("revoked {}", t.to_rfc3339()),
                        None if i.not_after < now => "expired".into(),
                        None => "valid".into(),
                    };
                    println!(
                        "{}  {:<20} {:<12} until {}  {state}",
                        i.serial,
                        i.name,
                        i.role,
                        i.not_after.to_rfc3339()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminCommand::Psql {
            data_dir,
            cert,
            key,
            psql_args,
        } => {
            let mut opts = crate::target::dir_options(&data_dir, ADMIN_ROLE)?;
            // The password is the second factor: psql asks for it.
            opts.password = None;
            opts.application_name = "dalp-admin".into();
            let url = format!(
                "{}&sslcert={}&sslkey={}",
                opts.to_url(),
                std::fs::canonicalize(&cert)
                    .with_context(|| format!("certificate {}", cert.display()))?
                    .display(),
                std::fs::canonicalize(&key)
                    .with_context(|| format!("key {}", key.display()))?
                    .display()
            );
            let status = std::process::Command::new("psql")
                .arg(url)
                .args(&psql_args)
                .env_remove("PGPASSWORD")
                .status()
                .context("run psql (install postgresql-client)")?;
            Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_bounded() {
        assert_eq!(parse_ttl("8h").unwrap(), chrono::Duration::hours(8));
        assert_eq!(parse_ttl("30m").unwrap(), chrono::Duration::minutes(30));
        assert!(parse_ttl("8").is_err());
        assert!(parse_ttl("0h").is_err());
        assert!(parse_ttl("8d").is_err());
        assert!(parse_ttl("xh").is_err());
    }
}
