//! dalp on a managed-style PostgreSQL (as on RDS, Cloud SQL, Azure): the only access is a
//! `NOSUPERUSER CREATEROLE CREATEDB` administrator, nothing is preloaded, the server's CA is
//! handed over as a file. From `dalp roles create` to a served API with an MFA-enrolled
//! administrator, no superuser is ever used.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{confirm_totp, dalp, dalp_with_stdin, free_port, login_and_enrol, text, DALP};
use dalp_testkit::managed::ManagedCluster;

/// The audit partitions after `this_month`'s, by name.
async fn audit_partitions_after(c: &tokio_postgres::Client, this_month: &str) -> Vec<String> {
    c.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'dalp_audit.events'::regclass AND c.relname::text > $1 ORDER BY 1",
        &[&this_month],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `dalp serve`, killed by pid when dropped (also when the test fails).
struct Serve(Child);
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_migrate_serve_and_first_admin_without_a_superuser() {
    let m = ManagedCluster::start().await;
    let work = dalp_testkit::server_dir("dalp-managed-cfg-");
    let secrets = work.path().join("secrets.json");
    let admin_url = m.admin_url();

    // Roles, twice: the second run changes nothing and must not fail either.
    for run in 1..=2 {
        let o = dalp(&[
            "roles",
            "create",
            "--database-url",
            &admin_url,
            "--secrets-file",
            secrets.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "roles create run {run}: {}", text(&o));
    }
    let passwords: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&secrets).unwrap()).unwrap();
    let migrator_url = m.url(
        "dalp_migrator",
        passwords["roles"]["dalp_migrator"].as_str().unwrap(),
    );
    let o = dalp(&["migrate", "--database-url", &migrator_url]);
    assert!(o.status.success(), "migrate: {}", text(&o));
    let o = dalp(&["roles", "check", "--database-url", &migrator_url]);
    assert!(o.status.success(), "roles check: {}", text(&o));

    // Doctor names what the provider must preload, and where to set it; HA, archiving and
    // backups are the provider's (info, not warnings).
    let o = dalp(&[
        "doctor",
        "--database-url",
        &migrator_url,
        "--managed",
        "--json",
    ]);
    let checks: Vec<serde_json::Value> =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    for name in ["replication", "archiving", "backups"] {
        let c = checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {checks:?}"));
        assert_eq!(c["status"], "info", "{c}");
        assert!(
            c["detail"].as_str().unwrap().contains("the provider"),
            "{c}"
        );
        assert!(
            c["next"].as_str().unwrap().contains("deploy-managed.md"),
            "{c}"
        );
    }
    let pgaudit = checks
        .iter()
        .find(|c| {
            c["check"] == "extensions" && c["detail"].as_str().unwrap().starts_with("pgaudit")
        })
        .unwrap_or_else(|| panic!("{checks:?}"));
    assert_eq!(pgaudit["status"], "warning", "{pgaudit}");
    assert!(
        pgaudit["next"]
            .as_str()
            .unwrap()
            .contains("shared_preload_libraries"),
        "{pgaudit}"
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // No role dalp created has an attribute it must not have.
    let admin = dalp_db::ConnectOptions::from_url(&admin_url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let privileged: Vec<String> = admin
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'dalp%'
               AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(privileged.is_empty(), "{privileged:?}");

    // `dalp serve` with a config naming the provider's CA and the secrets file.
    let api_port = free_port();
    let keys = work.path().join("keys");
    let config = work.path().join("dalp.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nhosts = [\"127.0.0.1:{}\"]\nname = \"dalp\"\nca_file = \"{}\"\nsecrets_file = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n[keys]\ndir = \"{}\"\n\n[maintenance]\npartition_interval_secs = 2\n",
            m.port(),
            m.ca_file().display(),
            secrets.display(),
            keys.display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // The first administrator, through the config; the password piped twice as for the
    // prompt: only the first line counts.
    let o = dalp_with_stdin(
        &[
            "users",
            "create-admin",
            "--config",
            cfg,
            "--email",
            "ops@bank.example",
        ],
        "correct horse battery staple\ncorrect horse battery staple\n",
    );
    assert!(o.status.success(), "create-admin: {}", text(&o));
    let _serve = Serve(
        Command::new(DALP)
            .args(["serve", "--config", cfg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "dalp serve not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api = format!("{base}/api/v1");
    let (token, secret) = login_and_enrol(
        &http,
        &api,
        "ops@bank.example",
        "correct horse battery staple",
    )
    .await;
    confirm_totp(&http, &api, &token, &secret).await;

    // `serve` keeps partitions ahead: drop the audit partitions of the coming months (as
    // the migrator, not a superuser) and they are back within a minute.
    let mut migrator = dalp_db::ConnectOptions::from_url(&migrator_url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let this_month = chrono::Utc::now().format("events_p%Y%m").to_string();
    let ahead = audit_partitions_after(&migrator, &this_month).await;
    assert!(
        !ahead.is_empty(),
        "no audit partition ahead of {this_month}"
    );
    {
        let tx = migrator.transaction().await.unwrap();
        tx.batch_execute("SET LOCAL ROLE dalp_owner").await.unwrap();
        for p in &ahead {
            tx.batch_execute(&format!("DROP TABLE dalp_audit.{p}"))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    assert!(audit_partitions_after(&migrator, &this_month)
        .await
        .is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    while audit_partitions_after(&migrator, &this_month).await != ahead {
        assert!(
            Instant::now() < deadline,
            "serve did not recreate {ahead:?} within a minute"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Keys rotate through the config too.
    let o = dalp(&["keys", "rotate", "--config", cfg]);
    assert!(o.status.success(), "keys rotate: {}", text(&o));
    assert!(
        text(&o).contains("1 data key(s) re-wrapped"),
        "{}",
        text(&o)
    );
}
