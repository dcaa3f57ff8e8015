//! `cargo bench -p dalp-cli --bench backup`
//!
//! Backup and restore throughput with pgBackRest on a database of about 1.2 GB, through the
//! `dalp` verbs as an operator runs them, with `pg_basebackup` (PostgreSQL's own physical
//! copy, uncompressed) of the same instance as the reference in the same run; then the
//! restore drill (`dalp backup verify`) and its recovery time. Two rounds in one run:
//! repositories encrypted (the default) and not (`encrypt = false`). The encrypted round
//! ends with the disaster: key bundle exported, the server SIGKILLed and its data directory
//! deleted, the instance rebuilt from the repository and the bundle (`dalp restore --keys`)
//! and started — the RTO of a lost instance.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Instant;

use dalp_db::MIGRATOR_ROLE;
use dalp_ops::backup::start_archiving;
use dalp_ops::embedded::{DATABASE, DEFAULT_PG_BIN};
use dalp_ops::{Instance, StartOptions};
use std::path::Path;

const DALP: &str = env!("CARGO_BIN_EXE_dalp");
const ROWS: i64 = 8_000_000;

fn dalp(args: &[&str]) -> (String, f64) {
    let t = Instant::now();
    let o = Command::new(DALP).args(args).output().expect("run dalp");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "dalp {args:?}: {text}");
    (text, t.elapsed().as_secs_f64())
}

async fn round(root: &Path, encrypt: bool) {
    let data = root.join(if encrypt { "encrypted" } else { "plain" });
    let repos = root.join(if encrypt {
        "repos-encrypted"
    } else {
        "repos-plain"
    });
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&repos).unwrap();
    std::fs::set_permissions(&repos, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        data.join("backup.toml"),
        format!(
            "encrypt = {encrypt}\nrepo1 = {{ type = \"posix\", path = \"{0}/repo1\" }}\nrepo2 = {{ type = \"posix\", path = \"{0}/repo2\" }}\n",
            repos.display()
        ),
    )
    .unwrap();
    let d = data.to_str().unwrap();
    let label = if encrypt { "encrypted" } else { "unencrypted" };
    let cluster = start_archiving(
        Instance::open(&data).unwrap(),
        StartOptions {
            slow_query_ms: Some(600_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut db = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    dalp_db::migrate::migrate(&mut db, &dalp_app::catalog::MIGRATIONS, false)
        .await
        .unwrap();
    let t = Instant::now();
    db.batch_execute(&format!(
        "CREATE SCHEMA bench;
         CREATE TABLE bench.t AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) AS pad
           FROM generate_series(1, {ROWS}) g;
         ALTER TABLE bench.t ADD PRIMARY KEY (id);"
    ))
    .await
    .unwrap();
    db.batch_execute("CHECKPOINT").await.ok();
    let bytes: i64 = db
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    let mb = bytes as f64 / 1e6;
    println!(
        "[{label}] database: {mb:.0} MB ({ROWS} rows + dalp's schemas), loaded in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    drop(db);

    // Reference: PostgreSQL's own base backup, plain format, WAL streamed.
    let base = root.join("basebackup");
    let su = cluster.layout().socket_dir();
    let t = Instant::now();
    let status = Command::new(format!("{DEFAULT_PG_BIN}/pg_basebackup"))
        .args([
            "-h",
            su.to_str().unwrap(),
            "-p",
            &cluster.port().to_string(),
        ])
        .args([
            "-U",
            "postgres",
            "-D",
            base.to_str().unwrap(),
            "-X",
            "stream",
            "-c",
            "fast",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let base_secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&base).ok();
    println!(
        "[{label}] pg_basebackup (reference, uncompressed): {base_secs:.1} s, {:.0} MB/s",
        mb / base_secs
    );

    let (_, backup_secs) = dalp(&["backup", "run", "--type", "full", "--data-dir", d]);
    let (list, _) = dalp(&["backup", "list", "--data-dir", d, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list[list.find('{').unwrap()..]).unwrap();
    let stored = list["backups"][0]["repo_size"].as_u64().unwrap() as f64 / 1e6;
    println!(
        "[{label}] dalp backup run --type full: {backup_secs:.1} s, {:.0} MB/s of database, {stored:.0} MB stored (lz4); {:.2}× pg_basebackup's time",
        mb / backup_secs,
        backup_secs / base_secs
    );

    let into = root.join("restored");
    let (_, restore_secs) = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--latest",
        "--into",
        into.to_str().unwrap(),
    ]);
    println!(
        "[{label}] dalp restore --latest (restore + recovery + start): {restore_secs:.1} s, {:.0} MB/s",
        mb / restore_secs
    );
    stop_postmaster(&into.join("pgdata"));
    std::fs::remove_dir_all(&into).ok();

    let (drill, drill_secs) = dalp(&["backup", "verify", "--data-dir", d]);
    let recovered = drill
        .split("recovered in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?");
    println!(
        "[{label}] dalp backup verify (restore drill): recovery time {recovered} s, whole drill {drill_secs:.1} s"
    );
    if !encrypt {
        cluster.shutdown().unwrap();
        return;
    }

    // The disaster: the host is gone. Only the repository and the key bundle remain.
    let bundle = repos.join("keys.bundle");
    let pass = repos.join("pass");
    std::fs::write(&pass, "benchmark passphrase").unwrap();
    dalp(&[
        "keys",
        "export",
        "--data-dir",
        d,
        "--out",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    let pid = postmaster_pid(&data.join("pgdata")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(cluster);
    std::fs::remove_dir_all(&data).unwrap();
    let rebuilt = root.join("rebuilt");
    let t = Instant::now();
    let (_, rebuild_secs) = dalp(&[
        "restore",
        "--keys",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--latest",
        "--into",
        rebuilt.to_str().unwrap(),
    ]);
    let cluster = start_archiving(Instance::open(&rebuilt).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let rto = t.elapsed().as_secs_f64();
    let db = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM bench.t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, ROWS);
    println!(
        "[{label}] lost instance rebuilt from the repository + key bundle: restore + recovery {rebuild_secs:.1} s, serving again after {rto:.1} s (RTO), {n} rows back"
    );
    drop(db);
    cluster.shutdown().unwrap();
}

fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn stop_postmaster(pgdata: &Path) {
    if let Some(pid) = postmaster_pid(pgdata) {
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGINT);
        for _ in 0..600 {
            if nix::sys::signal::kill(p, None).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::Builder::new()
        .prefix("dalp-bench-backup-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Encryption off and on in the same run, on the same machine.
    round(dir.path(), false).await;
    round(dir.path(), true).await;
}
