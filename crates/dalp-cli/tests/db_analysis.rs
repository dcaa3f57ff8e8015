//! `dalp db lint` and `dalp db top` against a real migrated database.

use std::process::{Command, Output};

use dalp_db::MIGRATOR_ROLE;
use dalp_testkit::{migrated_database, TestDb};

const DALP: &str = env!("CARGO_BIN_EXE_dalp");

fn dalp(db: &TestDb, args: &[&str]) -> Output {
    Command::new(DALP)
        .args(args)
        .env("DALP_DATABASE_URL", db.options(MIGRATOR_ROLE).to_url())
        .env_remove("DALP_DATA_DIR")
        .output()
        .unwrap()
}

#[tokio::test]
async fn lint_passes_on_our_schema_and_finds_a_planted_unindexed_foreign_key() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let out = dalp(&db, &["db", "lint", "--fail-on", "info"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no findings"), "{stdout}");

    db.superuser()
        .await
        .batch_execute(
            "CREATE TABLE dalp_workflows.planted (id bigint PRIMARY KEY,
                 run_id uuid REFERENCES dalp_workflows.runs (id));
             CREATE INDEX planted_dup_a ON dalp_workflows.planted (id, run_id);
             CREATE INDEX planted_dup_b ON dalp_workflows.planted (id, run_id);",
        )
        .await
        .unwrap();
    let out = dalp(&db, &["db", "lint", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks: Vec<(&str, &str)> = findings
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["check"].as_str().unwrap(), f["object"].as_str().unwrap()))
        .collect();
    assert!(
        checks.contains(&(
            "unindexed_foreign_key",
            "dalp_workflows.planted (planted_run_id_fkey)"
        )),
        "{checks:?}"
    );
    assert!(
        checks.iter().any(|(c, _)| *c == "duplicate_index"),
        "{checks:?}"
    );
    let fix = findings[0]["fix"].as_str().unwrap_or("");
    assert!(!fix.is_empty());
    // Only errors fail with --fail-on error: these are warnings.
    assert!(dalp(&db, &["db", "lint", "--fail-on", "error"])
        .status
        .success());
}

#[tokio::test]
async fn top_lists_statements_by_component() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let indexer = db.connect(dalp_db::Component::Indexer.role()).await;
    for _ in 0..20 {
        indexer
            .query("SELECT count(*) FROM dalp_indexed.chains", &[])
            .await
            .unwrap();
    }
    let out = dalp(
        &db,
        &[
            "db",
            "top",
            "--by",
            "calls",
            "--component",
            "indexer",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["query"]
                .as_str()
                .unwrap_or("")
                .contains("dalp_indexed.chains")
        })
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(row["component"], "dalp-indexer");
    assert!(row["calls"].as_i64().unwrap() >= 20);
    // Generic plans of the indexer's hot statements.
    for n in 0..5i64 {
        indexer
            .query(
                "SELECT name FROM dalp_indexed.chains WHERE chain_id = $1",
                &[&n],
            )
            .await
            .unwrap();
    }
    let out = dalp(
        &db,
        &["db", "explain", "--component", "indexer", "--by", "calls"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("WHERE chain_id = $1"), "{stdout}");
    assert!(
        stdout.contains("Index Scan using chains_pkey") || stdout.contains("Seq Scan on chains"),
        "{stdout}"
    );
    let out = dalp(&db, &["db", "top", "--by", "nonsense"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use total, mean or calls"));
}

#[tokio::test]
async fn doctor_is_clean_on_a_healthy_database_and_flags_an_expired_certificate() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let out = dalp(&db, &["doctor"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ok       connect",
        "ok       migrations",
        "ok       roles",
        "ok       schema_health",
    ] {
        assert!(stdout.contains(line), "{line} missing:\n{stdout}");
    }

    // A certificate that expired in 2020.
    let mut params = rcgen::CertificateParams::new(vec!["db.example".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("expired.pem");
    std::fs::write(&path, cert.pem()).unwrap();
    let out = dalp(&db, &["doctor", "--json", "--cert", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "an error is the worst finding");
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cert_check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "certificate")
        .unwrap();
    assert_eq!(cert_check["status"], "error");
    assert!(
        cert_check["detail"].as_str().unwrap().contains("EXPIRED"),
        "{cert_check}"
    );
    assert!(!cert_check["next"].as_str().unwrap().is_empty());

    // A table planted by hand: an unindexed foreign key (warning) and undeclared grants.
    db.superuser()
        .await
        .batch_execute(
            "CREATE TABLE dalp_workflows.planted2 (id bigint PRIMARY KEY,
                 run_id uuid REFERENCES dalp_workflows.runs (id))",
        )
        .await
        .unwrap();
    let out = dalp(&db, &["doctor"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("warning  schema_health  unindexed_foreign_key"),
        "{stdout}"
    );
    // Created outside the migrations, the table also lacks the declared grants: role drift,
    // an error, so the exit code is 2.
    assert!(stdout.contains("error    roles"), "{stdout}");
    assert_eq!(out.status.code(), Some(2));
}
