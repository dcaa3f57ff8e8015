//! The embedded cluster's lifecycle, each test with a data directory of its own.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;

use dalp_db::MIGRATOR_ROLE;
use dalp_ops::embedded::{inspect, DATABASE};
use dalp_ops::{Instance, OpsError, StartOptions};

fn data_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("dalp-ops-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[tokio::test]
async fn restart_reuses_data_port_and_passwords() {
    let dir = data_dir();
    let cluster = Instance::open(dir.path())
        .unwrap()
        .start(StartOptions::default())
        .await
        .unwrap();
    let port = cluster.port();
    let pid = cluster.pid().unwrap() as i32;
    let c = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    c.batch_execute("SET ROLE dalp_owner; CREATE TABLE public_keep (v text); INSERT INTO public_keep VALUES ('survives')")
        .await
        .unwrap_err(); // public is closed to everyone, even the owner
    c.batch_execute("SET ROLE dalp_owner; CREATE SCHEMA keep; CREATE TABLE keep.t (v text); INSERT INTO keep.t VALUES ('survives')")
        .await
        .unwrap();
    drop(c);
    let info = inspect(dir.path());
    assert!(info.running && info.initialised);
    assert_eq!(info.port, Some(port));
    let secrets_before = std::fs::read_to_string(dir.path().join("secrets.json")).unwrap();
    let mode = std::fs::metadata(dir.path().join("secrets.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secrets file must be private");
    cluster.shutdown().unwrap();
    assert!(
        !dalp_ops::process::alive(pid),
        "postgres still running after stop"
    );
    assert!(!inspect(dir.path()).running);

    let again = Instance::open(dir.path())
        .unwrap()
        .start(StartOptions::default())
        .await
        .unwrap();
    assert_eq!(again.port(), port, "the previous port is reused when free");
    let c = again
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    let v: String = c
        .query_one("SELECT v FROM keep.t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "survives");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("secrets.json")).unwrap(),
        secrets_before
    );
    // pgAudit is preloaded whenever the package is installed.
    let su = again.superuser_options("postgres").connect().await.unwrap();
    let preload: String = su
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .unwrap()
        .get(0);
    if std::path::Path::new("/usr/lib/postgresql/15/lib/pgaudit.so").exists() {
        assert!(preload.contains("pgaudit"), "{preload}");
        let classes: String = su.query_one("SHOW pgaudit.log", &[]).await.unwrap().get(0);
        assert_eq!(classes, "write, ddl, role");
        // A write is logged as an AUDIT line in the JSON server log.
        c.batch_execute("SET ROLE dalp_owner; INSERT INTO keep.t VALUES ('audited'); RESET ROLE")
            .await
            .unwrap();
        let mut found = false;
        for _ in 0..50 {
            let logs = json_logs(&dir.path().join("log"));
            if logs
                .lines()
                .any(|l| l.contains("AUDIT: SESSION") && l.contains("keep.t"))
            {
                assert!(logs
                    .lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
                found = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(found, "no AUDIT line for the write in the jsonlog");
        // Reporting reads (outside the API) are on record too: dalp_readonly and
        // dalp_auditor log the READ class.
        for role in ["dalp_readonly", "dalp_auditor"] {
            let set: Vec<String> = su
                .query_one(
                    "SELECT coalesce(s.setconfig, '{}') FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = $1",
                    &[&role],
                )
                .await
                .unwrap()
                .get(0);
            assert!(
                set.iter()
                    .any(|s| s.starts_with("pgaudit.log=") && s.contains("read")),
                "{role}: {set:?}"
            );
        }
        c.batch_execute("SET ROLE dalp_owner; GRANT USAGE ON SCHEMA keep TO dalp_readonly; GRANT SELECT ON keep.t TO dalp_readonly; RESET ROLE")
            .await
            .unwrap();
        let reader = again
            .role_options("dalp_readonly", DATABASE)
            .connect()
            .await
            .unwrap();
        reader.query("SELECT v FROM keep.t", &[]).await.unwrap();
        let mut read_logged = false;
        for _ in 0..50 {
            let logs = json_logs(&dir.path().join("log"));
            read_logged = logs.lines().any(|l| {
                l.contains("AUDIT: SESSION")
                    && l.contains(",READ,SELECT,")
                    && l.contains("keep.t")
                    && l.contains("\"user\":\"dalp_readonly\"")
            });
            if read_logged {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(read_logged, "no AUDIT READ line for dalp_readonly's SELECT");
    }
    // Checksums are on.
    let checksums: String = c
        .query_one("SHOW data_checksums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checksums, "on");
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    drop(c);
    again.shutdown().unwrap();
}

#[tokio::test]
async fn a_data_dir_in_use_is_refused_clearly() {
    let dir = data_dir();
    let cluster = Instance::open(dir.path())
        .unwrap()
        .start(StartOptions::default())
        .await
        .unwrap();
    let err = Instance::open(dir.path())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, OpsError::InUse { .. }), "{err}");
    assert!(
        err.to_string().contains(&std::process::id().to_string()),
        "names the holder's pid: {err}"
    );
    cluster.shutdown().unwrap();
    // Once stopped, the directory can be opened again.
    drop(Instance::open(dir.path()).unwrap());
}

#[tokio::test]
async fn a_busy_port_is_refused_before_anything_starts() {
    let dir = data_dir();
    let busy = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = busy.local_addr().unwrap().port();
    let err = Instance::open(dir.path())
        .unwrap()
        .start(StartOptions {
            pg_port: Some(port),
            bin_dir: None,
            pgaudit_log: None,
            slow_query_ms: None,
            max_connections: None,
            archive_command: None,
            archive_timeout_secs: None,
            managed: false,
        })
        .await
        .err()
        .expect("must fail");
    assert!(
        matches!(err, OpsError::PortInUse { port: p, .. } if p == port),
        "{err}"
    );
    assert!(err.to_string().contains("--pg-port"));
    assert!(!inspect(dir.path()).running);
}

#[tokio::test]
async fn a_missing_binary_dir_says_what_to_install() {
    let dir = data_dir();
    let err = Instance::open(dir.path())
        .unwrap()
        .start(StartOptions {
            pg_port: None,
            bin_dir: Some("/nonexistent/pg/bin".into()),
            pgaudit_log: None,
            slow_query_ms: None,
            max_connections: None,
            archive_command: None,
            archive_timeout_secs: None,
            managed: false,
        })
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, OpsError::MissingBinary(_)), "{err}");
    assert!(err.to_string().contains("DALP_PG_BIN"));
}

#[test]
fn a_private_parent_directory_is_reported_up_front() {
    if !nix::unistd::Uid::effective().is_root() {
        return; // only root switches to the postgres user
    }
    let outer = data_dir();
    let private = outer.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = Instance::open(&private.join("data"))
        .err()
        .expect("must fail");
    assert!(matches!(err, OpsError::NotTraversable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("postgres") && msg.contains("chmod o+x"),
        "{msg}"
    );
}

/// Every JSON server log in `dir`, concatenated.
fn json_logs(dir: &std::path::Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().map(|x| x == "json").unwrap_or(false))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}
