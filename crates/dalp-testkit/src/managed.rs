//! An emulated managed PostgreSQL (RDS, Cloud SQL, Azure): a bare PostgreSQL 15 with nothing
//! preloaded (no pgAudit, no pg_stat_statements) whose administrator, as on those services, is
//! `NOSUPERUSER CREATEROLE CREATEDB` and a member of a provider group holding `pg_monitor`
//! and `pg_signal_backend`, and owns the application database. The superuser is used once,
//! to make that administrator; a test then only ever gets the administrator's URL.

use std::path::PathBuf;

use dalp_ops::{Instance, RunningCluster, StartOptions};

/// The provider's administrator (like RDS's master user).
pub const ADMIN: &str = "cloudadmin";
/// The provider's group of granted predefined roles (like `rds_superuser`, minus superuser).
pub const PROVIDER_GROUP: &str = "cloud_superuser";

pub struct ManagedCluster {
    cluster: RunningCluster,
    password: String,
    _dir: tempfile::TempDir,
}

impl ManagedCluster {
    /// Starts the server and creates the administrator and the `dalp` database it owns.
    pub async fn start() -> ManagedCluster {
        let dir = crate::server_dir("dalp-managed-");
        let cluster = Instance::open(dir.path())
            .expect("open managed instance dir")
            .start(StartOptions {
                managed: true,
                ..Default::default()
            })
            .await
            .expect("start the managed-style server");
        let password = dalp_db::roles::generate_password(24);
        let su = cluster
            .superuser_options("postgres")
            .connect()
            .await
            .expect("superuser, once, to create the provider's admin");
        su.batch_execute(&format!(
            "CREATE ROLE {PROVIDER_GROUP} NOLOGIN;
             GRANT pg_monitor, pg_signal_backend TO {PROVIDER_GROUP};
             CREATE ROLE {ADMIN} LOGIN NOSUPERUSER CREATEROLE CREATEDB NOREPLICATION NOBYPASSRLS PASSWORD '{password}' IN ROLE {PROVIDER_GROUP};"
        ))
        .await
        .expect("create the provider's admin");
        su.batch_execute(&format!("CREATE DATABASE dalp OWNER {ADMIN}"))
            .await
            .expect("create the application database");
        ManagedCluster {
            cluster,
            password,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// The CA that signed the server's certificate (the provider's bundle, as `rds-ca.pem`).
    pub fn ca_file(&self) -> PathBuf {
        self.cluster.layout().ca_cert()
    }

    /// A verify-full URL for `user` with `password` on database `dalp`.
    pub fn url(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/dalp?sslmode=verify-full&sslrootcert={}",
            self.port(),
            self.ca_file().display()
        )
    }

    /// The administrator's URL: the only access a test has.
    pub fn admin_url(&self) -> String {
        self.url(ADMIN, &self.password)
    }
}
