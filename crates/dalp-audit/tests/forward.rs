//! The SIEM forwarder against a real syslog-over-TLS receiver (RFC 5425 framing).

use std::collections::BTreeSet;
use std::io::BufReader;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dalp_audit::export::{Format, Forwarder, Framer, SiemTls, SyslogTarget, DEFAULT_SD_ID};
use dalp_audit::{AuditEvent, AuditKey, Sealer};
use dalp_db::Component;
use dalp_ops::process::ServerUser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

/// Accepts TLS connections and records every framed message.
/// A forwarder as the sealer role to the receiver on `port`, RFC 5424, one event a batch
/// unpaced, no server logs; tests override what they need.
fn forwarder_to(
    pools: &dalp_db::ComponentPools,
    name: &str,
    port: u16,
    tls_dir: &std::path::Path,
) -> Forwarder {
    Forwarder {
        pool: pools.get(Component::AuditSealer).clone(),
        name: name.into(),
        framer: Framer::new(Format::Rfc5424, "test", DEFAULT_SD_ID, 8192).unwrap(),
        target: SyslogTarget::parse(&format!("syslog+tls://localhost:{port}")).unwrap(),
        tls: SiemTls::ca(tls_dir.join("ca.crt")),
        batch: 1,
        pace: Duration::ZERO,
        pgaudit_dir: None,
        settle: Duration::from_millis(200),
    }
}

/// Runs `f` until the task is aborted (a kill: no orderly close).
fn spawn(f: Arc<Forwarder>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (_keep, stop) = tokio::sync::watch::channel(false);
        f.run(stop, |_| {}).await.unwrap();
    })
}

/// The tests here share the test cluster's server log, which the idle-forwarder test watches
/// for writes: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn receiver(
    dir: &std::path::Path,
) -> (u16, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    dalp_ops::pki::ensure(dir, &ServerUser::resolve().unwrap()).unwrap();
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(
        std::fs::File::open(dir.join("server.crt")).unwrap(),
    ))
    .collect::<Result<_, _>>()
    .unwrap();
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        std::fs::File::open(dir.join("server.key")).unwrap(),
    ))
    .unwrap()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let sink = sink.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut r = tokio::io::BufReader::new(tls);
                loop {
                    let mut len = Vec::new();
                    if r.read_until(b' ', &mut len).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let Ok(n) = String::from_utf8_lossy(&len[..len.len() - 1]).parse::<usize>()
                    else {
                        return;
                    };
                    let mut msg = vec![0u8; n];
                    if r.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    sink.lock().unwrap().push(String::from_utf8(msg).unwrap());
                }
            });
        }
    });
    (port, got, task)
}

fn seqs(lines: &[String]) -> BTreeSet<i64> {
    lines
        .iter()
        .filter_map(|l| l.split("seq=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_killed_forwarder_resumes_and_delivers_everything_at_least_once() {
    let _serial = SERIAL.lock().await;
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let pools = db.pools();
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(AuditKey::open_or_create(&dir.path().join("audit.json")).unwrap());
    let sealer = Sealer::new(pools.get(Component::AuditSealer).clone(), key);
    let writer = pools.get(Component::Identity).get().await.unwrap();
    let write = |n: usize| {
        let w = &writer;
        async move {
            for i in 0..n {
                dalp_audit::record(
                    &***w,
                    &AuditEvent::new("service:test", "test.forward", "thing").resource(i),
                )
                .await
                .unwrap();
            }
        }
    };
    write(120).await;
    sealer
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();

    let tls_dir = dir.path().join("tls");
    let (port, got, _rx) = receiver(&tls_dir).await;
    let forwarder = Arc::new(Forwarder {
        batch: 10,
        pace: Duration::from_millis(20),
        pgaudit_dir: None,
        ..forwarder_to(&pools, "siem", port, &tls_dir)
    });
    let first = spawn(forwarder.clone());
    for _ in 0..500 {
        if got.lock().unwrap().len() >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.abort(); // killed mid-stream
    let _ = first.await;
    let cursor = forwarder.cursor().await.unwrap();
    let received = got.lock().unwrap().len() as i64;
    // The cursor never runs ahead of delivery (what was sent but not confirmed yet is sent
    // again).
    assert!(
        cursor <= received && cursor < 120,
        "cursor {cursor}, received {received}"
    );

    write(30).await;
    sealer
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    let second = spawn(forwarder.clone());
    let want: BTreeSet<i64> = (1..=150).collect();
    // Delivered, and the delivery recorded (the cursor moves only after a send).
    for _ in 0..1000 {
        // Take the lock in its own statement: never hold it across an await.
        let delivered = seqs(&got.lock().unwrap()).is_superset(&want);
        if delivered && forwarder.cursor().await.unwrap() == 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.abort();
    let lines = got.lock().unwrap().clone();
    assert!(
        seqs(&lines).is_superset(&want),
        "missing: {:?}",
        want.difference(&seqs(&lines)).collect::<Vec<_>>()
    );
    assert_eq!(forwarder.cursor().await.unwrap(), 150);
    // The signed chain head travels with the events: the SIEM witnesses the chain.
    let heads: Vec<dalp_audit::Checkpoint> = lines
        .iter()
        .filter(|l| l.contains(" dalp - chainhead "))
        .map(|l| serde_json::from_str(l.split_once("] ").unwrap().1).unwrap())
        .collect();
    assert!(
        heads.iter().any(|h| h.last_seq == 150),
        "no head covering the last event: {heads:?}"
    );
    // Every event line is RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG
    for l in lines.iter().filter(|l| !l.contains(" dalp - chainhead ")) {
        let parts: Vec<&str> = l.splitn(7, ' ').collect();
        assert!(parts[0].starts_with('<') && parts[0].ends_with(">1"), "{l}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(parts[1]).is_ok(),
            "{l}"
        );
        assert_eq!(&parts[2..6], &["test", "dalp", "-", "audit"], "{l}");
        assert!(parts[6].starts_with("[dalp@32473 seq=\""), "{l}");
    }
}

#[tokio::test]
async fn a_receiver_with_an_untrusted_certificate_is_refused() {
    let _serial = SERIAL.lock().await;
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let pools = db.pools();
    let dir = tempfile::tempdir().unwrap();
    let (port, got, _rx) = receiver(&dir.path().join("tls")).await;
    // Trust a different CA than the receiver's.
    let other = dir.path().join("other");
    dalp_ops::pki::ensure(&other, &ServerUser::resolve().unwrap()).unwrap();
    let target = SyslogTarget::parse(&format!("syslog+tls://localhost:{port}")).unwrap();
    let err = dalp_audit::export::SyslogSink::connect(&target, &SiemTls::ca(other.join("ca.crt")))
        .await
        .err();
    assert!(err.is_some(), "connected to a receiver the CA did not sign");
    assert!(got.lock().unwrap().is_empty());
    let _ = pools;
}

#[tokio::test]
async fn pgaudit_lines_from_the_json_server_log_are_shipped_too() {
    let _serial = SERIAL.lock().await;
    let cluster = dalp_testkit::cluster();
    let log_dir = cluster.layout().log_file().parent().unwrap().to_path_buf();
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let pools = db.pools();
    // A write: pgAudit's WRITE class logs it.
    let w = pools.get(Component::Identity).get().await.unwrap();
    dalp_audit::record(
        &**w,
        &AuditEvent::new("service:test", "test.pgaudit", "thing"),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let (port, got, _rx) = receiver(&tls_dir).await;
    let task = spawn(Arc::new(Forwarder {
        batch: 100,
        pgaudit_dir: Some(log_dir),
        ..forwarder_to(&pools, "pga", port, &tls_dir)
    }));
    let mut found = false;
    for _ in 0..300 {
        if got.lock().unwrap().iter().any(|l| {
            l.contains(" pgaudit - ")
                && l.contains("AUDIT: SESSION")
                && l.contains("dalp_audit.events")
        }) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert!(found, "no pgAudit line shipped");
    // The shipped payload is the server's JSON log line, intact.
    let line = got
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains(" pgaudit - "))
        .cloned()
        .unwrap();
    let json = line.splitn(8, ' ').nth(7).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(v["message"].as_str().unwrap().starts_with("AUDIT: "));
}

/// Lines of the JSON server logs that pgAudit wrote for database `db` about the forwarding
/// cursors.
fn cursor_audit_lines(log_dir: &std::path::Path, db: &str) -> Vec<String> {
    std::fs::read_dir(log_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.contains(&format!("\"dbname\":\"{db}\""))
                        && l.contains("AUDIT: ")
                        && l.contains("dalp_audit.forward_cursors")
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// An idle forwarder writes nothing for a minute (its cursor rows exist; nothing moved), so
/// pgAudit logs nothing for it, and it never ships its own bookkeeping.
#[tokio::test]
async fn an_idle_forwarder_adds_no_audit_lines_and_ships_none_of_its_own() {
    let _serial = SERIAL.lock().await;
    let cluster = dalp_testkit::cluster();
    let log_dir = cluster.layout().log_file().parent().unwrap().to_path_buf();
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let pools = db.pools();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let (port, got, _rx) = receiver(&tls_dir).await;
    let task = spawn(Arc::new(Forwarder {
        batch: 100,
        pgaudit_dir: Some(log_dir.clone()),
        ..forwarder_to(&pools, "idle", port, &tls_dir)
    }));
    // Settle: cursor rows created, the backlog of log files read and confirmed — until the
    // cursor writes stop (however long that takes on a busy machine), at least 3 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut before = cursor_audit_lines(&log_dir, &db.name);
    let mut quiet_since = std::time::Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) {
        assert!(
            std::time::Instant::now() < deadline,
            "the forwarder never went idle"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = cursor_audit_lines(&log_dir, &db.name);
        if now.len() != before.len() {
            before = now;
            quiet_since = std::time::Instant::now();
        }
    }
    // A minute of idle rounds (250 ms each).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = cursor_audit_lines(&log_dir, &db.name);
    task.abort();
    assert_eq!(
        after.len(),
        before.len(),
        "an idle forwarder wrote its cursors: {:?}",
        &after[before.len().min(after.len())..]
    );
    assert!(
        !got.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("dalp_audit.forward_cursors")),
        "the forwarder shipped its own cursor statements"
    );
}
