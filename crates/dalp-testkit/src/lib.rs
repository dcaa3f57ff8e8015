//! The shared test harness. Each test binary gets one ephemeral PostgreSQL cluster (the real
//! embedded cluster of `dalp-ops`, in a temp dir, on a free port), started on first use and
//! stopped by pid when the binary exits, also after a failed test. Each test then asks for
//! its own database: [`fresh_database`] (roles and grants, no schemas) or
//! [`migrated_database`] (a copy of a template with the given migration sets applied: a
//! domain crate's tests pass its own schema and the audit schema, the composed service's
//! tests `dalp_app::catalog::MIGRATIONS`). The kit depends on no domain and no HTTP code.

pub mod anvil;
pub mod history;
pub mod managed;
pub mod netns;
pub mod rsyslog;

/// A temporary directory under /tmp that the `postgres` user can enter (0755), removed
/// when dropped: for tests that start their own servers in it.
pub fn server_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create temp dir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    d
}

/// A finished command's stdout and stderr, for assertions and failure messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every file below `dir` (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A child process a test started: killed (SIGKILL) and reaped by pid when dropped, so it is
/// stopped also when the test fails.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use dalp_db::connect::ConnectOptions;
use dalp_db::{migrate, roles, Component, ComponentPools, MigrationSet, MIGRATOR_ROLE};
use dalp_ops::{Instance, Pooler, PoolerSpec, RunningCluster, StartOptions};
use tokio_postgres::Client;

struct Harness {
    cluster: RunningCluster,
    dir: tempfile::TempDir,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();
/// Template databases made so far, by the schemas migrated into them.
static TEMPLATES: tokio::sync::Mutex<Vec<String>> = tokio::sync::Mutex::const_new(Vec::new());

static POOLER: OnceLock<Pooler> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(p) = POOLER.get() {
        p.stop();
    }
    if let Some(h) = HARNESS.get() {
        let _ = h.cluster.stop();
        let _ = std::fs::remove_dir_all(h.dir.path());
    }
}

/// The cluster of this test binary, started on first call.
pub fn cluster() -> &'static RunningCluster {
    &HARNESS
        .get_or_init(|| {
            // Start on a thread of its own: the caller may be inside a runtime.
            std::thread::spawn(start_harness)
                .join()
                .expect("test cluster thread panicked")
        })
        .cluster
}

fn start_harness() -> Harness {
    let dir = tempfile::Builder::new()
        .prefix("dalp-test-")
        .tempdir_in("/tmp")
        .expect("create temp dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = rt
        .block_on(async {
            Instance::open(dir.path())?
                .start(StartOptions::default())
                .await
        })
        .unwrap_or_else(|e| panic!("starting the test cluster failed: {e}"));
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe {
        libc::atexit(stop_at_exit);
    }
    Harness { cluster, dir }
}

/// A PgBouncer (transaction mode, TLS and SCRAM on both sides, 20 server connections per
/// database × role) in front of this binary's cluster, started on first call.
pub fn pooler() -> &'static Pooler {
    POOLER.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let roles: Vec<&str> = dalp_db::component::login_roles().collect();
                let harness = HARNESS.get().expect("cluster started");
                let users = dalp_ops::pooler::scram_verifiers(
                    &harness.cluster.superuser_options("postgres"),
                    &roles,
                )
                .await
                .expect("read verifiers");
                Pooler::start(PoolerSpec {
                    dir: harness.dir.path().join("pgbouncer"),
                    tls_dir: harness.cluster.layout().tls_dir(),
                    server_port: harness.cluster.port(),
                    server_socket_dir: Some(harness.cluster.layout().socket_dir()),
                    // Two processes on the port, 20 server connections per role in all.
                    processes: 2,
                    port: None,
                    pool_size: 10,
                    max_client_conn: 1000,
                    users,
                })
                .await
                .unwrap_or_else(|e| panic!("starting PgBouncer failed: {e}"))
            })
        })
        .join()
        .expect("pooler thread panicked")
    })
}

/// Whether the component pools of tests go through [`pooler`] (`DALP_TEST_VIA_POOLER=1`):
/// the domain suites then run through PgBouncer in transaction mode.
pub fn via_pooler() -> bool {
    std::env::var("DALP_TEST_VIA_POOLER").is_ok_and(|v| v == "1")
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
}

fn next_name(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The superuser over the local socket, on `dbname`.
pub async fn superuser(dbname: &str) -> Client {
    cluster()
        .superuser_options(dbname)
        .connect()
        .await
        .expect("connect as superuser")
}

/// An empty database with dalp's database-level grants, no schemas yet.
pub async fn fresh_database() -> TestDb {
    let name = next_name("t");
    let su = superuser("postgres").await;
    cluster()
        .create_database(&su, &name)
        .await
        .expect("create test database");
    TestDb { name }
}

/// A database with the migration sets `sets` applied, in order (cloned from a template
/// migrated once per combination of sets).
pub async fn migrated_database(sets: &[MigrationSet]) -> TestDb {
    let template = format!(
        "dalp_template_{}",
        sets.iter()
            .map(|m| m.schema.trim_start_matches("dalp_"))
            .collect::<Vec<_>>()
            .join("_")
    );
    {
        let mut made = TEMPLATES.lock().await;
        if !made.contains(&template) {
            let su = superuser("postgres").await;
            cluster()
                .create_database(&su, &template)
                .await
                .expect("create template database");
            let db = TestDb {
                name: template.clone(),
            };
            let mut migrator = db.connect(MIGRATOR_ROLE).await;
            migrate::migrate(&mut migrator, sets, false)
                .await
                .expect("migrate template");
            made.push(template.clone());
        }
    }
    let name = next_name("m");
    let su = superuser("postgres").await;
    let sql = format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\"");
    let mut tries = 0;
    // The template's last session may still be closing; CREATE DATABASE refuses until it has.
    while let Err(e) = su.batch_execute(&sql).await {
        tries += 1;
        assert!(tries < 50, "cloning the template failed: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db_su = superuser(&name).await;
    roles::prepare_database(&db_su, &name)
        .await
        .expect("grant database privileges");
    TestDb { name }
}

impl TestDb {
    /// TCP + verify-full options for `role` on this database.
    pub fn options(&self, role: &str) -> ConnectOptions {
        cluster().role_options(role, &self.name)
    }

    /// A connection as `role` over TLS.
    pub async fn connect(&self, role: &str) -> Client {
        self.options(role)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
    }

    /// A connection as `component`'s role.
    pub async fn connect_as(&self, component: Component) -> Client {
        self.connect(component.role()).await
    }

    /// The superuser on this database (local socket).
    pub async fn superuser(&self) -> Client {
        superuser(&self.name).await
    }

    /// One pool per component on this database.
    pub fn pools(&self) -> ComponentPools {
        self.pools_sized(4)
    }

    /// Pools of `size` connections each (through PgBouncer with `DALP_TEST_VIA_POOLER=1`).
    pub fn pools_sized(&self, size: usize) -> ComponentPools {
        if via_pooler() {
            return self.pooled_pools(size);
        }
        let base = self.options(MIGRATOR_ROLE);
        ComponentPools::build(&base, cluster().secrets(), size, Duration::from_secs(5))
            .expect("build pools")
    }

    /// Pools of `size` connections each through [`pooler`]; direct options for LISTEN.
    pub fn pooled_pools(&self, size: usize) -> ComponentPools {
        let direct = self.options(MIGRATOR_ROLE);
        let pooled = pooler().client_options(&direct);
        ComponentPools::build_via(
            &pooled,
            &direct,
            cluster().secrets(),
            size,
            Duration::from_secs(10),
        )
        .expect("build pooled pools")
    }
}
