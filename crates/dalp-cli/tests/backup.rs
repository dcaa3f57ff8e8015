//! Backups and point-in-time recovery with real pgBackRest: the `dalp backup` and
//! `dalp restore` verbs against an embedded instance that archives its WAL.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dalp_db::MIGRATOR_ROLE;
use dalp_ops::backup::start_archiving;
use dalp_ops::embedded::DATABASE;
use dalp_ops::{Instance, StartOptions};

const DALP: &str = env!("CARGO_BIN_EXE_dalp");

fn dir() -> tempfile::TempDir {
    dalp_testkit::server_dir("dalp-bk-")
}

fn dalp(args: &[&str]) -> Output {
    Command::new(DALP).args(args).output().expect("run dalp")
}

fn text(o: &Output) -> String {
    dalp_testkit::output_text(o)
}

/// A restored copy `dalp restore` left running: stopped (by its postmaster pid) on drop.
struct Copy {
    dir: std::path::PathBuf,
    port: u16,
}

impl Copy {
    fn from_output(into: &Path, o: &Output) -> Copy {
        let t = text(o);
        assert!(o.status.success(), "{t}");
        let port = t
            .split("running on 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {t}"));
        Copy {
            dir: into.to_path_buf(),
            port,
        }
    }

    async fn rows(&self) -> BTreeSet<i32> {
        let c = superuser(&self.dir, self.port).await;
        c.query("SELECT n FROM pitr.rows", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgdata/postmaster.pid")) {
            if let Some(pid) = pid
                .lines()
                .next()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let p = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGINT);
                for _ in 0..300 {
                    if nix::sys::signal::kill(p, None).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_to_a_time_an_lsn_and_the_latest() {
    let dir = dir();
    let d = dir.path().to_str().unwrap();
    let cluster = start_archiving(Instance::open(dir.path()).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let db = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    let mut migrator = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    dalp_db::migrate::migrate(&mut migrator, &dalp_app::catalog::MIGRATIONS, false)
        .await
        .unwrap();
    drop(migrator);
    db.batch_execute(
        "CREATE SCHEMA pitr; CREATE TABLE pitr.rows (n int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await
    .unwrap();
    // (n, just before its INSERT, acknowledged at, WAL position after its commit)
    let mut log: Vec<(i32, DateTime<Utc>, DateTime<Utc>, String)> = Vec::new();
    let insert = |n: i32| {
        let db = &db;
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = Utc::now();
            db.execute("INSERT INTO pitr.rows (n) VALUES ($1)", &[&n])
                .await
                .unwrap();
            let acked = Utc::now();
            let lsn: String = db
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            (n, before, acked, lsn)
        }
    };
    for n in 1..=3 {
        log.push(insert(n).await);
    }
    let o = dalp(&["backup", "run", "--type", "full", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(full) to repo1"), "{}", text(&o));
    for n in 4..=6 {
        log.push(insert(n).await);
    }
    let o = dalp(&["backup", "run", "--type", "diff", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    for n in 7..=10 {
        log.push(insert(n).await);
    }

    // To a time between the commits of rows 8 and 9.
    let t = log[7].2 + (log[8].1 - log[7].2) / 2;
    let into = dir.path().join("at-time");
    let o = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--target-time",
        &t.to_rfc3339(),
        "--into",
        into.to_str().unwrap(),
    ]);
    let copy = Copy::from_output(&into, &o);
    assert_eq!(copy.rows().await, (1..=8).collect(), "restore to {t}");
    drop(copy);

    // To the WAL position right after row 5's commit.
    let into = dir.path().join("at-lsn");
    let o = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--target-lsn",
        &log[4].3,
        "--into",
        into.to_str().unwrap(),
    ]);
    let copy = Copy::from_output(&into, &o);
    assert_eq!(
        copy.rows().await,
        (1..=5).collect(),
        "restore to LSN {}",
        log[4].3
    );
    drop(copy);

    // Everything.
    let into = dir.path().join("latest");
    let o = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--latest",
        "--into",
        into.to_str().unwrap(),
    ]);
    let copy = Copy::from_output(&into, &o);
    assert!(text(&o).contains("timeline 2"), "{}", text(&o));
    assert_eq!(copy.rows().await, (1..=10).collect());
    drop(copy);

    // Targets outside the window, and places a restore must never write to.
    let fresh = dir.path().join("refused");
    let fresh = fresh.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--target-time", "2020-01-01T00:00:00Z"],
            "recoverable window",
        ),
        (
            vec!["--target-time", "2100-01-01T00:00:00Z"],
            "in the future",
        ),
        (vec!["--target-time", "yesterday"], "not a time"),
        (
            vec!["--target-lsn", "0/0"],
            "before the oldest restorable backup",
        ),
        (vec!["--target-lsn", "nonsense"], "not an LSN"),
    ] {
        let mut a = vec!["restore", "--data-dir", d, "--into", fresh];
        a.extend(args);
        let o = dalp(&a);
        assert!(!o.status.success(), "{a:?} must fail");
        assert!(text(&o).contains(says), "{a:?}: {}", text(&o));
    }
    assert!(!Path::new(fresh).join("pgdata/PG_VERSION").exists());
    let o = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--latest",
        "--into",
        into.to_str().unwrap(),
    ]);
    assert!(text(&o).contains("not empty"), "{}", text(&o));
    let live = dir.path().join("pgdata");
    let o = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--latest",
        "--into",
        live.to_str().unwrap(),
    ]);
    assert!(text(&o).contains("live data directory"), "{}", text(&o));
    let o = dalp(&["restore", "--data-dir", d, "--into", fresh]);
    assert!(!o.status.success(), "a target is required");

    // List, what is due, the schedule.
    let o = dalp(&["backup", "list", "--data-dir", d, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        listed["windows"][0]["earliest"].is_string()
            && listed["windows"][0]["latest_wal"].is_string(),
        "{listed}"
    );
    let list = &listed["backups"];
    let kinds: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["full", "diff"]);
    assert!(list[0]["size"].as_u64().unwrap() > 1_000_000);
    let o = dalp(&["backup", "due", "--data-dir", d, "--dry-run"]);
    let t = text(&o);
    assert!(
        t.contains("full backup to repo2") && !t.contains("repo1"),
        "{t}"
    );
    let o = dalp(&["backup", "schedule", "--data-dir", d]);
    assert!(text(&o).contains("backup due --data-dir"), "{}", text(&o));

    // The restore drill passes on an intact repository …
    let o = dalp(&["backup", "verify", "--data-dir", d]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("pg_amcheck: ok") && t.contains("migrations current: yes"),
        "{t}"
    );
    // … and fails loudly when a backup file is damaged.
    let backup_dir = dir.path().join("backup/repo1/backup/dalp");
    let label = list[1]["label"].as_str().unwrap();
    let mut files: Vec<std::path::PathBuf> =
        dalp_testkit::files_under(&backup_dir.join(label).join("pg_data"));
    files.sort_by_key(|f| std::cmp::Reverse(std::fs::metadata(f).unwrap().len()));
    let victim = &files[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    let end = mid + 64.min(bytes.len() - mid);
    for b in &mut bytes[mid..end] {
        *b ^= 0xff;
    }
    std::fs::write(victim, bytes).unwrap();
    let o = dalp(&["backup", "verify", "--data-dir", d]);
    assert!(
        !o.status.success(),
        "a damaged backup must fail the drill: {}",
        text(&o)
    );
    eprintln!("drill on a damaged repository: {}", text(&o));
    // The source is untouched throughout.
    let n: i64 = db
        .query_one("SELECT count(*) FROM pitr.rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10);
    drop(db);
    cluster.shutdown().unwrap();
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_repository_fails_the_backup_clearly_and_leaves_the_source_alone() {
    let dir = dir();
    let d = dir.path().to_str().unwrap();
    let tiny = dir.path().join("tiny-repo");
    std::fs::create_dir_all(&tiny).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&tiny)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(tiny.clone());
    std::fs::write(
        dir.path().join("backup.toml"),
        format!(
            "archive_timeout_secs = 10\nrpo_secs = 15\n[repo1]\ntype = \"posix\"\npath = \"{}\"\n",
            tiny.display()
        ),
    )
    .unwrap();
    let cluster = start_archiving(Instance::open(dir.path()).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let db = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    // The policy's RPO is the server's archive_timeout.
    let timeout: String = db
        .query_one("SHOW archive_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "15s");
    db.batch_execute(
        "CREATE SCHEMA keep; CREATE TABLE keep.t AS SELECT g AS n, md5(g::text) AS v FROM generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    let o = dalp(&["backup", "run", "--data-dir", d]);
    let t = text(&o);
    assert!(
        !o.status.success(),
        "a backup into a full repository must fail: {t}"
    );
    assert!(
        t.to_lowercase().contains("space"),
        "the error must say the disk is full: {t}"
    );
    // The source keeps serving reads and writes, its data intact.
    db.execute("INSERT INTO keep.t VALUES (0, 'after')", &[])
        .await
        .unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM keep.t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200_001);
    let o = dalp(&["backup", "list", "--data-dir", d]);
    assert!(text(&o).contains("no backups yet"), "{}", text(&o));
    drop(db);
    cluster.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_a_broken_archive_command_and_missing_backups() {
    let dir = dir();
    let d = dir.path().to_str().unwrap();
    let cluster = start_archiving(Instance::open(dir.path()).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let doctor = || {
        let o = dalp(&["doctor", "--json", "--data-dir", d]);
        let checks: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        (o.status.code(), checks)
    };
    let find = |checks: &serde_json::Value, name: &str| -> Vec<serde_json::Value> {
        checks
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == name)
            .cloned()
            .collect()
    };
    let (_, checks) = doctor();
    assert_eq!(find(&checks, "archiving")[0]["status"], "ok", "{checks}");
    let backups = find(&checks, "backups");
    assert!(
        backups.iter().all(|b| b["status"] == "warning")
            && backups[0]["detail"]
                .as_str()
                .unwrap()
                .contains("no full backup"),
        "{checks}"
    );

    // Break archiving and make the server try.
    let su = cluster
        .superuser_options("postgres")
        .connect()
        .await
        .unwrap();
    su.batch_execute("ALTER SYSTEM SET archive_command = '/bin/false'")
        .await
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    su.batch_execute("CREATE TABLE wal_maker AS SELECT generate_series(1, 1000) g")
        .await
        .unwrap();
    su.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    for _ in 0..100 {
        let failed: i64 = su
            .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
            .await
            .unwrap()
            .get(0);
        if failed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, checks) = doctor();
    let archiving = &find(&checks, "archiving")[0];
    assert_eq!(archiving["status"], "error", "{checks}");
    assert!(
        archiving["detail"]
            .as_str()
            .unwrap()
            .contains("archive_command is failing"),
        "{archiving}"
    );
    assert!(!archiving["next"].as_str().unwrap().is_empty());
    assert_eq!(code, Some(2));
    su.batch_execute("ALTER SYSTEM RESET archive_command")
        .await
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    drop(su);
    cluster.shutdown().unwrap();
}

/// A connection as the superuser over `dir`'s socket.
async fn superuser(dir: &Path, port: u16) -> tokio_postgres::Client {
    dalp_db::ConnectOptions {
        hosts: vec![(dir.join("run").display().to_string(), port)],
        dbname: DATABASE.into(),
        user: "postgres".into(),
        password: None,
        ca_file: None,
        application_name: "test".into(),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: None,
        read_write: false,
    }
    .connect()
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_instance_is_rebuilt_from_the_repository_and_the_key_bundle_losing_at_most_the_rpo()
{
    lose_and_rebuild(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_synchronous_wal_receiver_a_lost_instance_loses_no_acknowledged_transaction() {
    lose_and_rebuild(true).await;
}

/// Writes for a few seconds, SIGKILLs the server right after an acknowledgement, deletes
/// its data directory, rebuilds it from the repository (and the receiver's WAL) and the key
/// bundle, and checks what survived: everything acknowledged with the receiver, all but the
/// last RPO seconds without.
async fn lose_and_rebuild(wal_receiver: bool) {
    const RPO_SECS: i64 = 2;
    let dir = dir();
    let safe = dalp_testkit::server_dir("dalp-bk-safe-");
    let lost = dir.path().join("instance");
    std::fs::create_dir(&lost).unwrap();
    let receiver_line = if wal_receiver {
        format!("wal_receiver_dir = \"{}/wal\"\n", safe.path().display())
    } else {
        String::new()
    };
    std::fs::write(
        lost.join("backup.toml"),
        format!(
            "rpo_secs = {RPO_SECS}\nrepo1 = {{ type = \"posix\", path = \"{0}/repo1\" }}\nrepo2 = {{ type = \"posix\", path = \"{0}/repo2\" }}\n{receiver_line}",
            safe.path().display()
        ),
    )
    .unwrap();
    let l = lost.to_str().unwrap();
    let cluster = start_archiving(Instance::open(&lost).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let mut migrator = cluster
        .role_options(MIGRATOR_ROLE, DATABASE)
        .connect()
        .await
        .unwrap();
    dalp_db::migrate::migrate(&mut migrator, &dalp_app::catalog::MIGRATIONS, false)
        .await
        .unwrap();
    migrator
        .batch_execute("CREATE SCHEMA pitr; CREATE TABLE pitr.rows (n int PRIMARY KEY)")
        .await
        .unwrap();
    let o = dalp(&["backup", "run", "--data-dir", l]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        lost.join("keys/backup-cipher.pass").exists(),
        "a new repository is encrypted"
    );
    let bundle = safe.path().join("keys.bundle");
    let pass = safe.path().join("pass");
    std::fs::write(&pass, "a passphrase long enough\n").unwrap();
    let o = dalp(&[
        "keys",
        "export",
        "--data-dir",
        l,
        "--out",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // Acknowledged writes, each with the WAL position after its commit; then the host is
    // gone: SIGKILL, disk deleted. Halfway, the segment holding the first rows is switched
    // and the test waits until it is archived, so the check below is never vacuous whatever
    // the machine's speed.
    let admin = superuser(&lost, cluster.port()).await;
    let mut acked: Vec<(i32, u64, std::time::Instant)> = Vec::new();
    let mut n = 0;
    let mut first_archived = 0;
    for phase in 0..2 {
        let writing = std::time::Instant::now();
        while writing.elapsed() < Duration::from_secs(2) {
            n += 1;
            migrator
                .execute("INSERT INTO pitr.rows (n) VALUES ($1)", &[&n])
                .await
                .unwrap();
            let at: i64 = migrator
                .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
                .await
                .unwrap()
                .get(0);
            acked.push((n, at as u64, std::time::Instant::now()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if phase == 0 {
            let switched: String = admin
                .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
                .await
                .unwrap()
                .get(0);
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while last_archived(&admin).await.is_none_or(|w| w < switched) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "segment {switched} not archived within 120 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            first_archived = acked.len();
        }
    }
    // Everything up to the end of the newest archived segment, read just before the crash,
    // must come back.
    let segment_size: i64 = admin
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let archived_end = segment_end(
        &last_archived(&admin).await.expect("a segment was archived"),
        segment_size as u64,
    );
    let pid: i32 = std::fs::read_to_string(lost.join("pgdata/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let crashed = std::time::Instant::now();
    drop(admin);
    drop(migrator);
    drop(cluster);
    std::fs::remove_dir_all(&lost).unwrap();

    // A wrong passphrase is refused and leaves nothing behind.
    let rebuilt = dir.path().join("rebuilt");
    let r = rebuilt.to_str().unwrap();
    let wrong = safe.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase at all").unwrap();
    let o = dalp(&[
        "restore",
        "--keys",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        wrong.to_str().unwrap(),
        "--into",
        r,
        "--latest",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("passphrase is wrong"), "{}", text(&o));
    assert!(!rebuilt.exists());
    // A target outside the window is refused up front, naming the window.
    let o = dalp(&[
        "restore",
        "--keys",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--into",
        r,
        "--target-time",
        "2020-01-01T00:00:00Z",
    ]);
    assert!(
        text(&o).contains("recoverable window of repo1"),
        "{}",
        text(&o)
    );
    assert!(!rebuilt.exists());

    let o = dalp(&[
        "restore",
        "--keys",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--into",
        r,
        "--latest",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("dalp up --data-dir"), "{}", text(&o));

    // `dalp up`'s start path on the rebuilt directory: archiving resumes, same keys.
    let cluster = start_archiving(Instance::open(&rebuilt).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let su = superuser(&rebuilt, cluster.port()).await;
    let present: BTreeSet<i32> = su
        .query("SELECT n FROM pitr.rows", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost_rows: Vec<&(i32, u64, std::time::Instant)> = acked
        .iter()
        .filter(|(n, _, _)| !present.contains(n))
        .collect();
    let oldest_lost = lost_rows
        .first()
        .map(|(_, _, at)| crashed.duration_since(*at));
    eprintln!(
        "{} of {} acknowledged rows survived; the oldest lost was acknowledged {:?} before the crash (RPO {RPO_SECS} s)",
        acked.len() - lost_rows.len(),
        acked.len(),
        oldest_lost
    );
    if wal_receiver {
        // Every acknowledged commit had its WAL flushed by the receiver: nothing is lost.
        assert!(
            lost_rows.is_empty(),
            "{} acknowledged rows lost",
            lost_rows.len()
        );
    } else {
        // Without it, what was archived before the crash is recovered: every row whose
        // commit lies within the archived WAL (at most the policy's RPO of writes, the
        // archive_timeout, is at risk beyond it).
        let lost_archived: Vec<i32> = lost_rows
            .iter()
            .filter(|(_, at, _)| *at <= archived_end)
            .map(|(n, _, _)| *n)
            .collect();
        assert!(
            lost_archived.is_empty(),
            "rows committed within the archived WAL were lost: {lost_archived:?}"
        );
    }
    assert!(
        acked[..first_archived]
            .iter()
            .all(|(n, _, _)| present.contains(n)),
        "rows whose segment was archived before the crash survive"
    );
    let o = dalp(&["backup", "run", "--data-dir", r]);
    assert!(
        o.status.success(),
        "archiving and backups go on: {}",
        text(&o)
    );
    let o = dalp(&["backup", "evidence", "--data-dir", r, "--json"]);
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let actions: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["backup.completed", "backup.restore", "backup.completed"],
        "{ev}"
    );
    assert_eq!(ev[1]["details"]["kind"], "lost_instance");
    assert!(ev[1]["details"]["rto_seconds"].as_f64().unwrap() > 0.0);
    if wal_receiver {
        let o = dalp(&["doctor", "--data-dir", r]);
        assert!(text(&o).contains("achieved RPO bound: 0"), "{}", text(&o));
    }
    drop(su);
    cluster.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ad_hoc_full_backups_do_not_shorten_the_point_in_time_window() {
    let dir = dir();
    let d = dir.path().to_str().unwrap();
    // One full a day and one day of PITR: before, WAL was kept for ceil(24/24) = 1 full, so
    // every extra full expired WAL still inside the window.
    std::fs::write(
        dir.path().join("backup.toml"),
        "pitr_days = 1\nfull_every_hours = 24\n",
    )
    .unwrap();
    let cluster = start_archiving(Instance::open(dir.path()).unwrap(), StartOptions::default())
        .await
        .unwrap();
    let db = superuser(dir.path(), cluster.port()).await;
    db.batch_execute("CREATE SCHEMA pitr; CREATE TABLE pitr.rows (n int PRIMARY KEY)")
        .await
        .unwrap();
    let o = dalp(&["backup", "run", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    for n in 1..=2 {
        db.execute("INSERT INTO pitr.rows (n) VALUES ($1)", &[&n])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let between = Utc::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.execute("INSERT INTO pitr.rows (n) VALUES (3)", &[])
        .await
        .unwrap();
    for _ in 0..3 {
        let o = dalp(&["backup", "run", "--data-dir", d]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let into = dir.path().join("in-window");
    let o = dalp(&[
        "restore",
        "--data-dir",
        d,
        "--target-time",
        &between.to_rfc3339(),
        "--into",
        into.to_str().unwrap(),
    ]);
    let copy = Copy::from_output(&into, &o);
    assert_eq!(copy.rows().await, (1..=2).collect());
    drop(copy);
    drop(db);
    cluster.shutdown().unwrap();
}

/// The newest WAL segment the server reports archived.
async fn last_archived(c: &tokio_postgres::Client) -> Option<String> {
    c.query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
        .await
        .unwrap()
        .get(0)
}

/// The WAL position (bytes) where segment `name` (`TTTTTTTTXXXXXXXXYYYYYYYY`) ends.
fn segment_end(name: &str, segment_size: u64) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    (log * (0x1_0000_0000 / segment_size) + seg + 1) * segment_size
}
