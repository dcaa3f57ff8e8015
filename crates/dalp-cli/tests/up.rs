//! End-to-end: the `dalp` binary as a user runs it, against the real embedded cluster.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{confirm_totp, dalp, dalp_with_stdin, free_port, login_and_enrol, text, DALP};

/// A CA that did not sign our server certificate (public certificate only, no key).
const FOREIGN_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjjCCATWgAwIBAgIUK17zeuBXliucPu4dQAVV2TpHhukwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRc29tZW9uZSBlbHNlJ3MgQ0EwIBcNMjYxMTIzMjE1NTQ3WhgP
MjEyNjEwMzAyMTU1NDdaMBwxGjAYBgNVBAMMEXNvbWVvbmUgZWxzZSdzIENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEAMecHpex369iChz5mRgkLTVsZNTyGQJD
WyDSBIDGTTMpk2S+ZNj+lYOUbsgprzSJw/CbqgJavmy6ZXqFxfAslqNTMFEwHQYD
VR0OBBYEFPi7BjScmdWqtEWlKJJO5dXtJx6wMB8GA1UdIwQYMBaAFPi7BjScmdWq
tEWlKJJO5dXtJx6wMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIg
PWnf27vWxR+KqwVaBYR6l3so+9kzuew3vtZB7iKrAlwCIAVfvaMwCsEb4nwwC1qu
zJ/9EjuRHJujgzPgIkmgdT/T
-----END CERTIFICATE-----\n";

fn data_dir() -> tempfile::TempDir {
    dalp_testkit::server_dir("dalp-cli-")
}

/// A running `dalp up`, stopped (SIGTERM, then SIGKILL) when dropped, also on test failure.
struct Up {
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
    ready_line: String,
}

impl Up {
    fn start(dir: &Path, api_port: u16) -> Up {
        Up::start_with(dir, api_port, &[])
    }

    fn start_with(dir: &Path, api_port: u16, extra: &[&str]) -> Up {
        let mut child = Command::new(DALP)
            .args(["up", "--data-dir"])
            .arg(dir)
            .args(["--api-port", &api_port.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dalp up");
        let (out_tx, out_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let mut up = Up {
            child: Some(child),
            stderr: err_rx,
            ready_line: String::new(),
        };
        loop {
            match out_rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line.contains("ready") => {
                    up.ready_line = line;
                    // The lines printed with it (connect hint, demo credentials).
                    while let Ok(more) = out_rx.recv_timeout(Duration::from_millis(300)) {
                        up.ready_line.push('\n');
                        up.ready_line.push_str(&more);
                    }
                    return up;
                }
                Ok(_) => continue,
                Err(_) => {
                    let log: Vec<String> = up.stderr.try_iter().collect();
                    panic!("dalp up did not print ready; stderr:\n{}", log.join("\n"));
                }
            }
        }
    }

    /// The demo administrator's password `--demo` printed with the ready line.
    fn demo_password(&self) -> String {
        self.ready_line
            .split("password ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("{}", self.ready_line))
            .to_string()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait; returns the exit status and everything it wrote to stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        let log: Vec<String> = self.stderr.try_iter().collect();
        (status, log.join("\n"))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            for _ in 0..300 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn db_url(dir: &Path, role: &str) -> String {
    let o = dalp(&[
        "db",
        "url",
        "--data-dir",
        dir.to_str().unwrap(),
        "--role",
        role,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn psql(url: &str, sql: &str) -> Output {
    Command::new("psql")
        .args([url, "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .output()
        .expect("run psql")
}

fn roles_check(dir: &Path) -> Output {
    dalp(&["roles", "check", "--data-dir", dir.to_str().unwrap()])
}

#[test]
fn up_serves_a_tls_only_least_privilege_cluster_and_restarts_with_its_data() {
    let dir = data_dir();
    let d = dir.path().to_str().unwrap();
    let api_port = free_port();
    let up = Up::start(dir.path(), api_port);
    assert!(
        up.ready_line
            .contains(&format!("http://127.0.0.1:{api_port}")),
        "{}",
        up.ready_line
    );
    assert!(up.ready_line.contains("ca.crt"), "{}", up.ready_line);

    // The API answers.
    let health = reqwest::blocking_get(&format!("http://127.0.0.1:{api_port}/healthz"));
    assert_eq!(health, 200);
    let ready = reqwest::blocking_get(&format!("http://127.0.0.1:{api_port}/readyz"));
    assert_eq!(ready, 200);

    // The indexer's URL works with psql as is; without TLS it is refused.
    let indexer = db_url(dir.path(), "dalp_indexer_svc");
    assert!(indexer.contains("sslmode=verify-full") && indexer.contains("sslrootcert="));
    let o = psql(&indexer, "select 1");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
    let o = psql(
        &indexer.replace("sslmode=verify-full", "sslmode=disable"),
        "select 1",
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("no encryption"), "{}", text(&o));
    // A client that does not trust our CA is refused too (verify-full).
    let foreign_ca = dir.path().join("foreign-ca.crt");
    std::fs::write(&foreign_ca, FOREIGN_CA).unwrap();
    let untrusting: String = indexer
        .split('&')
        .map(|p| {
            if p.starts_with("sslrootcert=") {
                format!("sslrootcert={}", foreign_ca.display())
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    let o = psql(&untrusting, "select 1");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("certificate verify failed"),
        "{}",
        text(&o)
    );

    // Least privilege: the indexer cannot read identity tables.
    for table in ["users", "organisations"] {
        let o = psql(&indexer, &format!("select * from dalp_identity.{table}"));
        assert!(!o.status.success());
        assert!(text(&o).contains("permission denied"), "{}", text(&o));
    }
    // The identity service appends an audit record; the auditor can read but not change it.
    let identity = db_url(dir.path(), "dalp_identity_svc");
    let o = psql(
        &identity,
        "insert into dalp_audit.events (actor, action, resource_type, outcome) values ('e2e', 'probe', 'test', 'success')",
    );
    assert!(o.status.success(), "{}", text(&o));
    let auditor = db_url(dir.path(), "dalp_auditor");
    for sql in [
        "update dalp_audit.events set actor = 'x'",
        "delete from dalp_audit.events",
    ] {
        let o = psql(&auditor, sql);
        assert!(!o.status.success(), "{sql} was allowed");
        assert!(text(&o).contains("permission denied"), "{}", text(&o));
    }

    // The matrix passes, then fails after a manual GRANT, then passes once it is revoked.
    let o = roles_check(dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let migrator = db_url(dir.path(), "dalp_migrator");
    let o = psql(
        &migrator,
        "set role dalp_owner; grant select on dalp_identity.users to dalp_indexer_svc",
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = roles_check(dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("dalp_indexer_svc on dalp_identity.users: has r, declared -"),
        "{}",
        text(&o)
    );
    let o = psql(
        &migrator,
        "set role dalp_owner; revoke select on dalp_identity.users from dalp_indexer_svc",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(roles_check(dir.path()).status.success());

    // Status reports the running cluster, its version, schemas and roles.
    let o = dalp(&["status", "--data-dir", d, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["instance"]["running"], true);
    assert!(status["server_version"].as_str().unwrap().starts_with("15"));
    assert_eq!(status["schemas"].as_array().unwrap().len(), 5);
    assert!(status["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["applied_version"] == s["latest_version"]));
    assert!(status["roles"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "dalp_owner" && r["login"] == false));
    let server_pid = status["instance"]["server_pid"].as_i64().unwrap() as i32;
    // No secret in status output.
    let secrets = std::fs::read_to_string(dir.path().join("secrets.json")).unwrap();
    let secrets: serde_json::Value = serde_json::from_str(&secrets).unwrap();
    let o = dalp(&["status", "--data-dir", d]);
    for pw in secrets["roles"].as_object().unwrap().values() {
        assert!(!text(&o).contains(pw.as_str().unwrap()));
        assert!(!up.ready_line.contains(pw.as_str().unwrap()));
    }

    // A second instance on the same directory is refused with the holder's pid.
    let o = dalp(&[
        "up",
        "--data-dir",
        d,
        "--api-port",
        &free_port().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("in use by a running dalp") && text(&o).contains(&up.pid().to_string()),
        "{}",
        text(&o)
    );

    // SIGTERM stops the API and PostgreSQL cleanly.
    let (status, log) = up.terminate();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        !Path::new(&format!("/proc/{server_pid}")).exists(),
        "postgres survived"
    );
    let o = dalp(&["status", "--data-dir", d, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["instance"]["running"], false);

    // Running it again reuses the data: nothing to migrate, the audit record is still there.
    let up = Up::start(dir.path(), api_port);
    let o = psql(
        &db_url(dir.path(), "dalp_auditor"),
        "select count(*) from dalp_audit.events where actor = 'e2e'",
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1",
        "{}",
        text(&o)
    );
    let (status, log) = up.terminate();
    assert!(status.success());
    let total: usize = dalp_app::catalog::MIGRATIONS
        .iter()
        .map(|s| s.migrations.len())
        .sum();
    assert!(
        log.contains(&format!("0 applied now, {total} already applied")),
        "{log}"
    );
}

#[test]
fn a_busy_api_port_fails_fast_with_a_clear_error() {
    let dir = data_dir();
    let busy = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = busy.local_addr().unwrap().port();
    let o = dalp(&[
        "up",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--api-port",
        &port.to_string(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("port {port}")) && text(&o).contains("--api-port"),
        "{}",
        text(&o)
    );
    // Nothing was initialised.
    assert!(!dir.path().join("pgdata").exists());
}

#[test]
fn verbs_on_a_missing_instance_say_what_to_do() {
    let dir = data_dir();
    let d = dir.path().join("never-started");
    let o = dalp(&[
        "db",
        "url",
        "--data-dir",
        d.to_str().unwrap(),
        "--role",
        "dalp_readonly",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("dalp up"), "{}", text(&o));
    let o = dalp(&["status", "--data-dir", d.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(text(&o).contains("not initialised"), "{}", text(&o));
    let o = dalp(&[
        "migrate",
        "--database-url",
        "postgres://dalp_migrator@127.0.0.1:1/dalp?sslmode=require&sslrootcert=/x",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("verify-full"), "{}", text(&o));
}

#[test]
fn config_check_rejects_unknown_keys() {
    let dir = data_dir();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[database]\nhosts = [\"127.0.0.1:5432\"]\npool_max_size = 4\n",
    )
    .unwrap();
    let o = dalp(&["config", "check", "--config", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // The effective configuration as TOML (defaults filled in), not a Rust debug dump.
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!out.contains("DatabaseConfig {"), "{out}");
    let effective: toml::Table = toml::from_str(&out).expect("config check prints TOML");
    assert_eq!(effective["database"]["pool_max_size"].as_integer(), Some(4));
    assert_eq!(
        effective["database"]["statement_timeout_ms"].as_integer(),
        Some(30000)
    );
    assert_eq!(effective["api"]["listen"].as_str(), Some("127.0.0.1:8080"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[database]\npool_size = 4\n").unwrap();
    let o = dalp(&["config", "check", "--config", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("unknown field `pool_size`"),
        "{}",
        text(&o)
    );
}

mod reqwest {
    /// Status code of a GET, via a blocking client on a throwaway runtime; 0 when nothing
    /// answers (not listening yet, or any more).
    pub fn blocking_get(url: &str) -> u16 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { ::reqwest::get(url).await.map_or(0, |r| r.status().as_u16()) })
    }
}

#[test]
fn create_admin_then_rotate_keys_while_the_server_keeps_reading() {
    let dir = data_dir();
    let d = dir.path().to_str().unwrap();
    let api_port = free_port();
    let up = Up::start(dir.path(), api_port);
    let args = [
        "users",
        "create-admin",
        "--data-dir",
        d,
        "--email",
        "Root@Bank.example",
    ];
    let o = dalp_with_stdin(&args, "correct horse battery staple\n");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("root@bank.example"), "{}", text(&o));
    let o = dalp_with_stdin(&args, "correct horse battery staple\n");
    assert!(!o.status.success(), "duplicate admin accepted");
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    let o = dalp_with_stdin(
        &[
            "users",
            "create-admin",
            "--data-dir",
            d,
            "--email",
            "x@bank.example",
        ],
        "short\n",
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("at least 12"), "{}", text(&o));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = ::reqwest::Client::new();
        let base = format!("http://127.0.0.1:{api_port}/api/v1");
        let (token, secret) = login_and_enrol(
            &http,
            &base,
            "root@bank.example",
            "correct horse battery staple",
        )
        .await;

        // Rotate while the server runs: the TOTP secret's data key moves to the new KEK and
        // the server, holding the old key file in memory, still decrypts it.
        let o = dalp(&["keys", "rotate", "--data-dir", d]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("1 data key(s) re-wrapped"),
            "{}",
            text(&o)
        );
        confirm_totp(&http, &base, &token, &secret).await;
    });
    let keyfile = std::fs::metadata(dir.path().join("keys/kek.json")).unwrap();
    assert_eq!(keyfile.permissions().mode() & 0o777, 0o600);

    // The running instance sealed all of that; a checkpoint anchors it; verify passes.
    let cp = dir.path().join("checkpoint.json");
    let mut verified = false;
    for _ in 0..50 {
        let o = dalp(&[
            "audit",
            "checkpoint",
            "--data-dir",
            d,
            "--out",
            cp.to_str().unwrap(),
        ]);
        let v = dalp(&[
            "audit",
            "verify",
            "--data-dir",
            d,
            "--checkpoint",
            cp.to_str().unwrap(),
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap_or_default();
        if o.status.success()
            && v.status.success()
            && report["events_checked"].as_u64().unwrap_or(0) >= 5
        {
            verified = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(verified, "verify never passed with the sealed events");
    let o = dalp(&["partitions", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("dalp_audit.events") && text(&o).contains("retention 84 months"),
        "{}",
        text(&o)
    );
    let o = dalp(&[
        "partitions",
        "--data-dir",
        d,
        "--apply",
        "--audit-retention-months",
        "0",
    ]);
    assert!(!o.status.success(), "retention of 0 months accepted");
    let o = dalp(&[
        "partitions",
        "--data-dir",
        d,
        "--apply",
        "--audit-retention-months",
        "120",
    ]);
    assert!(
        o.status.success() && text(&o).contains("retention 120 months"),
        "{}",
        text(&o)
    );

    // Export: JSON lines to a file in sequence order, CEF to standard output.
    let jsonl = dir.path().join("audit.jsonl");
    let o = dalp(&[
        "audit",
        "export",
        "--data-dir",
        d,
        "--format",
        "jsonl",
        "--to",
        jsonl.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let seqs: Vec<i64> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(
        seqs.len() >= 5 && seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{seqs:?}"
    );
    let o = dalp(&["audit", "export", "--data-dir", d, "--format", "cef"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout)
        .lines()
        .all(|l| l.starts_with("CEF:0|dalp|dalp|")));
    let o = dalp(&["audit", "export", "--data-dir", d, "--format", "xml"]);
    assert!(
        !o.status.success() && text(&o).contains("jsonl, csv, cef or rfc5424"),
        "{}",
        text(&o)
    );
    // SIEM settings that cannot work are refused before anything is sent.
    let siem = [
        "audit",
        "export",
        "--data-dir",
        d,
        "--to",
        "syslog+tls://localhost:9",
    ];
    for (extra, says) in [
        (&["--format", "cef"][..], "--ca is required"),
        (
            &["--format", "csv", "--ca", "x"][..],
            "csv cannot be sent to a SIEM",
        ),
        (&["--sd-id", "dalp", "--ca", "x"][..], "is not an SD-ID"),
        (&["--max-frame", "100", "--ca", "x"][..], "at least 480"),
        (
            &["--ca", "/nonexistent/ca.crt"][..],
            "CA bundle /nonexistent/ca.crt",
        ),
    ] {
        let o = dalp(&[&siem[..], extra].concat());
        assert!(
            !o.status.success() && text(&o).contains(says),
            "{extra:?}: {}",
            text(&o)
        );
    }

    // The signing key rotates while dalp runs: the chain hands over inside itself, verify
    // (trusting only the first key's public half) follows, the old key is kept aside.
    let o = dalp(&["audit", "rotate-key", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("hands the chain over"), "{}", text(&o));
    let keys = dir.path().join("keys");
    assert!(
        std::fs::read_dir(&keys)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".retired.json")),
        "no retired key kept"
    );
    let o = dalp(&["audit", "verify", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));

    // The superuser (local socket, peer) edits a sealed event: verify fails and says where.
    let socket = dir.path().join("run");
    let port = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.path().join("instance.json")).unwrap(),
    )
    .unwrap()["pg_port"]
        .to_string();
    let o = Command::new("psql")
        .args(["-X", "-h", socket.to_str().unwrap(), "-p", &port, "-U", "postgres", "-d", "dalp", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg("SET session_replication_role = replica; UPDATE dalp_audit.events SET details = '{}' WHERE id = (SELECT min(id) FROM dalp_audit.events)")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = dalp(&["audit", "verify", "--data-dir", d]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("TAMPERED") && text(&o).contains("changed after sealing"),
        "{}",
        text(&o)
    );
    let o = dalp(&[
        "audit",
        "verify",
        "--data-dir",
        d,
        "--audit-key",
        "/nonexistent.json",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--audit-key"), "{}", text(&o));

    let (status, _) = up.terminate();
    assert!(status.success());
}

#[test]
fn up_with_demo_seeds_once_and_the_admin_can_log_in() {
    let dir = data_dir();
    let api_port = free_port();
    let up = Up::start_with(dir.path(), api_port, &["--demo"]);
    let line = up
        .ready_line
        .lines()
        .find(|l| l.contains("demo:"))
        .unwrap_or_else(|| panic!("{}", up.ready_line))
        .to_string();
    let password = line
        .split("password ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let readonly = db_url(dir.path(), "dalp_readonly");
    let o = psql(
        &readonly,
        "select string_agg(base_type, ',' order by base_type) from dalp_assets.assets",
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "bond,stablecoin",
        "{}",
        text(&o)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r: serde_json::Value = ::reqwest::Client::new()
            .post(format!("http://127.0.0.1:{api_port}/api/v1/auth/login"))
            .json(&serde_json::json!({ "email": "admin@demo.dalp.example", "password": password }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["mfa_required"], true, "{r}");
    });
    let (status, _) = up.terminate();
    assert!(status.success());
    // Again with --demo: nothing new, no password printed.
    let up = Up::start_with(dir.path(), api_port, &["--demo"]);
    assert!(!up.ready_line.contains("password"), "{}", up.ready_line);
    let o = psql(&readonly, "select count(*) from dalp_assets.assets");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
    let (status, _) = up.terminate();
    assert!(status.success());
}

/// Runs `dalp cluster down` on drop, so an HA cluster never outlives a failed test.
struct ClusterDown<'a>(&'a Path);

impl Drop for ClusterDown<'_> {
    fn drop(&mut self) {
        let _ = dalp(&["cluster", "down", "--dir", self.0.to_str().unwrap()]);
    }
}

fn readyz_within(api_port: u16, within: Duration) -> u16 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let code = reqwest::blocking_get(&format!("http://127.0.0.1:{api_port}/readyz"));
        if code == 200 || std::time::Instant::now() > deadline {
            return code;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn up_ha_serves_the_api_on_patroni_and_the_cluster_verbs_manage_it() {
    let dir = data_dir();
    let d = dir.path().to_str().unwrap();
    let _down = ClusterDown(dir.path());
    let api_port = free_port();
    let up = Up::start_with(dir.path(), api_port, &["--ha", "--demo"]);
    assert!(up.ready_line.contains("HA 3 nodes"), "{}", up.ready_line);
    assert_eq!(readyz_within(api_port, Duration::from_secs(10)), 200);
    // `dalp serve` on the same cluster, configured as an operator would: every node as a
    // host (writes go to the primary), the nodes as read replicas, the cluster's CA,
    // secrets file and keys. It is the same application as `up`, so the same checks hold.
    let ha = dalp_ops::HaCluster::open(dir.path()).unwrap();
    let nodes: Vec<String> = ha
        .nodes()
        .iter()
        .map(|n| format!("\"127.0.0.1:{}\"", n.pg_port))
        .collect();
    let serve_port = free_port();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nhosts = [{nodes}]\nreplicas = [{nodes}]\nname = \"dalp\"\nca_file = \"{}\"\nsecrets_file = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{serve_port}\"\n\n[keys]\ndir = \"{}\"\n",
            ha.ca_cert().display(),
            dir.path().join("secrets.json").display(),
            dir.path().join("keys").display(),
            nodes = nodes.join(", "),
        ),
    )
    .unwrap();
    let _serve = dalp_testkit::Reaped(
        Command::new(DALP)
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(readyz_within(serve_port, Duration::from_secs(60)), 200);
    replica_reads_see_their_own_writes(&up, &[api_port, serve_port]);

    let o = dalp(&["cluster", "status", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("leader") && t.contains("sync_standby"), "{t}");
    let o = dalp(&["cluster", "status", "--dir", d, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 3);

    // Every other verb takes the cluster directory as --data-dir.
    let o = roles_check(dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let url = db_url(dir.path(), "dalp_readonly");
    assert_eq!(url.matches("127.0.0.1:").count(), 3, "{url}");
    assert!(url.contains("target_session_attrs=read-write"), "{url}");

    // A stopped replica: doctor names it, with an error.
    let leader = t
        .lines()
        .find(|l| l.contains(" leader "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let replica = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    ha.stop_node(replica);
    let o = dalp(&["doctor", "--data-dir", d]);
    let doc = text(&o);
    assert_eq!(o.status.code(), Some(2), "{doc}");
    assert!(
        doc.contains("error    replication") && doc.contains(&format!("not streaming: {replica}")),
        "{doc}"
    );
    // `cluster heal` starts only what stopped and waits for health.
    let o = dalp(&["cluster", "heal", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("started patroni {replica};")),
        "{}",
        text(&o)
    );
    let o = dalp(&["cluster", "status", "--dir", d]);
    let mut healthy = o.status.success();
    for _ in 0..120 {
        if healthy {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        healthy = dalp(&["cluster", "status", "--dir", d]).status.success()
            && text(&dalp(&["doctor", "--data-dir", d])).contains("ok       replication");
    }
    assert!(healthy, "the replica did not come back");

    // A switchover under the running API: it keeps answering.
    let o = dalp(&["cluster", "switchover", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("leader is now"), "{}", text(&o));
    assert_eq!(readyz_within(api_port, Duration::from_secs(30)), 200);
    let o = dalp(&["cluster", "switchover", "--dir", d, "--candidate", "nodeX"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("nodeX"), "{}", text(&o));

    // `dalp up --ha` started the cluster, so it stops it.
    let (status, log) = up.terminate();
    assert!(status.success(), "{log}");
    let o = dalp(&["cluster", "status", "--dir", d]);
    assert!(!o.status.success());
    assert!(text(&o).contains("dalp cluster up"), "{}", text(&o));

    // Restart with its data; migrations are already there; then down.
    let o = dalp(&["cluster", "up", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 applied now"), "{}", text(&o));
    let o = dalp(&["cluster", "up", "--dir", d]);
    assert!(!o.status.success(), "a second up must refuse");
    assert!(text(&o).contains("already running"), "{}", text(&o));
    let o = dalp(&["cluster", "down", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let o = dalp(&["cluster", "down", "--dir", d]);
    assert!(text(&o).contains("nothing running"), "{}", text(&o));
}

/// On `dalp up --ha` every node is a read replica candidate: asset and indexed reads go to a
/// replica, and a read that sends a change's consistency token always sees that change.
/// This holds on each API (`up`'s, then `serve`'s, one session for both): token-less reads are
/// served by replicas, and every change's consistency token makes the next read see it.
fn replica_reads_see_their_own_writes(up: &Up, api_ports: &[u16]) {
    let password = up.demo_password();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = ::reqwest::Client::new();
        let first = format!("http://127.0.0.1:{}/api/v1", api_ports[0]);
        let (token, secret) =
            login_and_enrol(&http, &first, "admin@demo.dalp.example", &password).await;
        confirm_totp(&http, &first, &token, &secret).await;
        for (i, port) in api_ports.iter().enumerate() {
            let api = format!("http://127.0.0.1:{port}/api/v1");
            let assets: serde_json::Value = http
                .get(format!("{api}/assets"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let org = assets["assets"][0]["organisation_id"]
                .as_str()
                .unwrap()
                .to_string();
            // Reads without a token: served by replicas once the lag probe has found them
            // (within a second of start on an idle machine; 20 s allowed).
            let mut from_replica = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            for n in 0.. {
                if (n >= 40 && from_replica > 0) || Instant::now() > deadline {
                    break;
                }
                let r = http
                    .get(format!("{api}/assets"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let from = r.headers()["x-dalp-read-from"]
                    .to_str()
                    .unwrap()
                    .to_string();
                if from.starts_with("replica ") {
                    from_replica += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                from_replica > 0,
                "no read was served by a replica (port {port})"
            );
            // Read-your-writes: every change's token makes the next read see it, wherever it is
            // served.
            for n in 0..20 {
                let r = http
                .post(format!("{api}/assets"))
                .bearer_auth(&token)
                .json(
                    &serde_json::json!({"organisation_id": org, "name": format!("Tower {i}.{n}"),
                    "symbol": format!("TW{i}{n}"), "decimals": 0, "base_type": "real_estate"}),
                )
                .send()
                .await
                .unwrap();
                assert_eq!(r.status(), 201);
                let consistency = r.headers()["x-dalp-consistency"]
                    .to_str()
                    .unwrap()
                    .to_string();
                // The position and the primary's timeline (X/Y@T).
                assert!(
                    consistency
                        .split_once('@')
                        .is_some_and(|(lsn, tl)| lsn.contains('/') && tl.parse::<u32>().is_ok()),
                    "{consistency}"
                );
                let created: serde_json::Value = r.json().await.unwrap();
                let id = created["asset"]["id"].as_str().unwrap();
                let r = http
                    .get(format!("{api}/assets/{id}"))
                    .bearer_auth(&token)
                    .header("x-dalp-consistency", &consistency)
                    .send()
                    .await
                    .unwrap();
                let from = r.headers()["x-dalp-read-from"]
                    .to_str()
                    .unwrap()
                    .to_string();
                assert_eq!(
                    r.status(),
                    200,
                    "asset {n} not seen with its token (read from {from})"
                );
            }
            let r = http
                .get(format!("{api}/assets"))
                .bearer_auth(&token)
                .header("x-dalp-consistency", "nonsense")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400);
        }
    });
}

#[test]
fn pool_up_serves_the_embedded_instance_through_pgbouncer() {
    let dir = data_dir();
    let d = dir.path().to_str().unwrap();
    let up = Up::start(dir.path(), free_port());
    let port = free_port();
    let mut pool = dalp_testkit::Reaped(
        Command::new(DALP)
            .args([
                "pool",
                "up",
                "--data-dir",
                d,
                "--port",
                &port.to_string(),
                "--pool-size",
                "5",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(pool.0.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(
        ready.contains("pool ready") && ready.contains(&port.to_string()),
        "{ready}"
    );
    // Beside the embedded instance it uses the server's Unix socket, one process per CPU.
    assert!(ready.contains("Unix socket"), "{ready}");
    let o = dalp(&[
        "db",
        "url",
        "--data-dir",
        d,
        "--role",
        "dalp_readonly",
        "--port",
        &port.to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let url = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(url.contains(&format!("127.0.0.1:{port}")), "{url}");
    let o = psql(&url, "select current_user");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "dalp_readonly");
    let o = psql(
        &url.replace("sslmode=verify-full", "sslmode=disable"),
        "select 1",
    );
    assert!(
        !o.status.success(),
        "plaintext to the pooler must be refused"
    );
    // A second pooler on the same port says so.
    let o = dalp(&["pool", "up", "--data-dir", d, "--port", &port.to_string()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already in use"), "{}", text(&o));
    kill(Pid::from_raw(pool.0.id() as i32), Signal::SIGTERM).unwrap();
    assert!(pool.0.wait().unwrap().success());
    let o = psql(&url, "select 1");
    assert!(!o.status.success(), "the pooler stopped with its command");
    drop(up);
}

#[test]
fn admin_access_needs_a_valid_certificate_for_the_role_and_the_password() {
    let dir = data_dir();
    let d = dir.path().to_str().unwrap();
    let up = Up::start(dir.path(), free_port());
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path().to_str().unwrap();
    let o = dalp(&[
        "admin",
        "cert",
        "issue",
        "--data-dir",
        d,
        "--name",
        "alice",
        "--ttl",
        "1h",
        "--out",
        c,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let serial = text(&o)
        .split("serial ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .to_string();
    let key_mode = std::fs::metadata(certs.path().join("alice.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let url = db_url(dir.path(), "dalp_admin");
    let with = |cert: &str, key: &str| format!("{url}&sslcert={cert}&sslkey={key}");
    let alice = with(&format!("{c}/alice.crt"), &format!("{c}/alice.key"));

    // Both factors: in, as the owner's member (not a superuser).
    let o = psql(
        &alice,
        "select current_user, rolsuper from pg_roles where rolname = current_user",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "dalp_admin|f");
    let o = psql(&alice, "select count(*) from dalp_identity.users");
    assert!(o.status.success(), "{}", text(&o));

    // The password without a certificate.
    let o = psql(&url, "select 1");
    assert!(!o.status.success(), "no certificate must be refused");
    // The certificate with a wrong password.
    let pw = url
        .split("dalp_admin:")
        .nth(1)
        .and_then(|r| r.split('@').next())
        .unwrap();
    let o = psql(&alice.replace(pw, "wrong-password"), "select 1");
    assert!(!o.status.success(), "a wrong password must be refused");
    // A certificate issued by our CA to another role.
    let tls = dir.path().join("tls");
    let (_, cert, key) =
        dalp_ops::pki::issue_client(&tls, "dalp_migrator", "mallory", chrono::Duration::hours(1))
            .unwrap();
    let write_pair = |name: &str, cert: &str, key: &str| {
        let cp = certs.path().join(format!("{name}.crt"));
        let kp = certs.path().join(format!("{name}.key"));
        std::fs::write(&cp, cert).unwrap();
        dalp_db::secrets::write_private(&kp, key).unwrap();
        with(cp.to_str().unwrap(), kp.to_str().unwrap())
    };
    let o = psql(&write_pair("mallory", &cert, &key), "select 1");
    assert!(
        !o.status.success(),
        "a certificate for another role must be refused"
    );
    // An expired certificate.
    let (_, cert, key) =
        dalp_ops::pki::issue_client(&tls, "dalp_admin", "old", chrono::Duration::hours(-1))
            .unwrap();
    let o = psql(&write_pair("old", &cert, &key), "select 1");
    assert!(
        !o.status.success(),
        "an expired certificate must be refused"
    );
    // A certificate from a CA the server does not trust.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dalp_admin");
    let k = rcgen::KeyPair::generate().unwrap();
    let self_signed = params.self_signed(&k).unwrap();
    let o = psql(
        &write_pair("foreign", &self_signed.pem(), &k.serialize_pem()),
        "select 1",
    );
    assert!(!o.status.success(), "a foreign certificate must be refused");
    // Revoked: refused at once.
    let o = dalp(&[
        "admin",
        "cert",
        "revoke",
        "--data-dir",
        d,
        "--serial",
        &serial,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = psql(&alice, "select 1");
    assert!(!o.status.success(), "a revoked certificate must be refused");
    assert!(text(&o).contains("revoked"), "{}", text(&o));
    let o = dalp(&["admin", "cert", "list", "--data-dir", d]);
    assert!(
        text(&o).contains("revoked") && text(&o).contains("expired"),
        "{}",
        text(&o)
    );

    // The administrator's statements were audited (pgAudit session log).
    let logs: String = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.lines().any(|l| l.contains("\"user\":\"dalp_admin\"")
            && l.contains("AUDIT: SESSION")
            && l.contains("dalp_identity.users")),
        "no pgAudit session entry for dalp_admin"
    );
    assert!(
        logs.contains("connection authorized: user=dalp_admin"),
        "the administrator's logins are not logged"
    );
    drop(up);
}

/// The serial of the certificate the server at `port` presents (openssl s_client).
fn served_serial(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -starttls postgres -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn tls_rotates_under_a_live_session_and_no_secret_reaches_logs_or_ps() {
    let dir = data_dir();
    let d = dir.path().to_str().unwrap();
    let up = Up::start(dir.path(), free_port());
    let port: u16 = up
        .ready_line
        .split("postgres 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let url = db_url(dir.path(), "dalp_readonly");
    let before = served_serial(port);
    assert!(before.starts_with("serial="), "{before}");
    // A session that spans the rotation.
    let held = Command::new("psql")
        .args([
            url.as_str(),
            "-X",
            "-At",
            "-c",
            "select pg_sleep(3), 'held'",
        ])
        .output();
    let o = dalp(&["tls", "rotate", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let after = served_serial(port);
    assert!(
        after.starts_with("serial=") && after != before,
        "{before} → {after}"
    );
    let o = psql(&url, "select 1");
    assert!(
        o.status.success(),
        "new sessions verify the new certificate: {}",
        text(&o)
    );
    let held = held.unwrap();
    assert!(String::from_utf8_lossy(&held.stdout).contains("held"));

    // The certificate is valid for the server's names only.
    let wrong_host = format!(
        "{}&hostaddr=127.0.0.1",
        url.replace("@127.0.0.1:", "@db.example:")
    );
    let o = psql(&wrong_host, "select 1");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not match host name"),
        "{}",
        text(&o)
    );
    // No superuser over TCP, even with TLS.
    let su = format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        dir.path().join("tls/ca.crt").display()
    );
    let o = psql(&su, "select 1");
    assert!(!o.status.success());
    assert!(text(&o).contains("pg_hba.conf"), "{}", text(&o));

    // No generated secret in process listings or any log.
    let secrets: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("secrets.json")).unwrap())
            .unwrap();
    let values: Vec<String> = secrets["roles"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(values.len() >= 9);
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    let reports = text(&dalp(&["status", "--data-dir", d]))
        + &text(&dalp(&["status", "--data-dir", d, "--json"]))
        + &text(&dalp(&["doctor", "--data-dir", d]));
    let auditor = db_url(dir.path(), "dalp_auditor");
    let audit = psql(&auditor, "select details::text from dalp_audit.events");
    assert!(audit.status.success(), "{}", text(&audit));
    let audit = String::from_utf8_lossy(&audit.stdout).to_string();
    let (status, stderr) = up.terminate();
    assert!(status.success());
    let mut logs = stderr;
    for entry in dalp_testkit::files_under(&dir.path().join("log"))
        .into_iter()
        .chain(dalp_testkit::files_under(&dir.path().join("backup/log")))
    {
        logs.push_str(&std::fs::read_to_string(entry).unwrap_or_default());
    }
    for v in &values {
        assert!(!ps.contains(v.as_str()), "a secret is visible in ps");
        assert!(
            !reports.contains(v.as_str()),
            "a secret is in dalp status or doctor"
        );
        assert!(
            !audit.contains(v.as_str()),
            "a secret is in the audit details"
        );
        assert!(!logs.contains(v.as_str()), "a secret reached a log");
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
fn api_certs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "api test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (dir.join("api.crt"), dir.join("api.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    dalp_db::secrets::write_private(&k, &key.serialize_pem()).unwrap();
    (c, k, ca_cert.pem())
}

/// GET `path` over TLS, trusting only `ca_pem`; the status code, or the handshake error.
async fn https_get(port: u16, path: &str, ca_pem: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_with_a_configured_certificate_and_refuses_plain_http() {
    let dir = data_dir();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, ca) = api_certs(certs.path());
    let api_port = free_port();
    let up = Up::start_with(
        dir.path(),
        api_port,
        &[
            "--api-tls-cert",
            cert.to_str().unwrap(),
            "--api-tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        up.ready_line
            .contains(&format!("https://127.0.0.1:{api_port}")),
        "{}",
        up.ready_line
    );
    assert_eq!(https_get(api_port, "/readyz", &ca).await, Ok(200));
    // A client that trusts another CA does not get through.
    let (_, _, other_ca) = api_certs(tempfile::tempdir().unwrap().path());
    let e = https_get(api_port, "/healthz", &other_ca)
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = ::reqwest::get(format!("http://127.0.0.1:{api_port}/healthz")).await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plain HTTP must not be served"
    );
    // A certificate without its key is refused at start.
    let o = dalp(&[
        "up",
        "--data-dir",
        data_dir().path().to_str().unwrap(),
        "--api-port",
        &free_port().to_string(),
        "--api-tls-cert",
        cert.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("go together"), "{}", text(&o));
    drop(up);
}

/// Group-committed request audit under a crash: clients read `/me` concurrently while dalp
/// is killed (SIGKILL); after a restart, every request that got a 2xx has its `api.request`
/// event (the answer waited for the commit that holds it).
#[test]
fn no_2xx_answer_lacks_its_audit_event_after_a_kill() {
    let dir = data_dir();
    let api_port = free_port();
    let up = Up::start_with(dir.path(), api_port, &["--demo"]);
    let password = up.demo_password();
    let api = format!("http://127.0.0.1:{api_port}/api/v1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let answered: Vec<String> = rt.block_on(async {
        let http = ::reqwest::Client::new();
        let (token, secret) =
            login_and_enrol(&http, &api, "admin@demo.dalp.example", &password).await;
        confirm_totp(&http, &api, &token, &secret).await;
        let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..16 {
            let (http, api, token, answered) =
                (http.clone(), api.clone(), token.clone(), answered.clone());
            tasks.push(tokio::spawn(async move {
                let mut errors = 0;
                for n in 0.. {
                    let id = format!("kill-{c}-{n}");
                    match http
                        .get(format!("{api}/me"))
                        .bearer_auth(&token)
                        .header("x-request-id", &id)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => {
                            answered.lock().unwrap().push(id);
                            errors = 0;
                        }
                        _ => {
                            errors += 1;
                            if errors > 20 {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        // Kill once the load is well under way.
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered.lock().unwrap().len() < 300 {
            assert!(Instant::now() < deadline, "the load did not get going");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill(Pid::from_raw(up.pid()), Signal::SIGKILL).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let v = answered.lock().unwrap().clone();
        v
    });
    drop(up);
    let up = Up::start(dir.path(), api_port);
    let auditor = db_url(dir.path(), "dalp_auditor");
    let o = psql(
        &auditor,
        "SELECT request_id FROM dalp_audit.events WHERE action = 'api.request' AND request_id LIKE 'kill-%'",
    );
    assert!(o.status.success(), "{}", text(&o));
    let recorded: std::collections::HashSet<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = answered
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no audit event, e.g. {:?}",
        missing.len(),
        answered.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(answered.len() >= 300);
    let (status, _) = up.terminate();
    assert!(status.success());
}
