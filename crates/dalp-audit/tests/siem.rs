//! SIEM delivery against a real rsyslog (Debian's, with gnutls and RELP), started by each
//! test as its own instance: the receiver stopped while the forwarder is idle, stopped and
//! restarted mid-stream, killed (connections reset) — every sealed event arrives at least
//! once, counted by its sequence number; framing as rsyslog parses it; orderly TLS closes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_audit::export::{
    read_sealed, Format, Forwarder, Framer, Progress, SiemTls, SyslogSink, SyslogTarget,
    DEFAULT_SD_ID,
};
use dalp_audit::{AuditEvent, AuditKey, Outcome, Sealer};
use dalp_db::{Component, ComponentPools};
use dalp_testkit::rsyslog::{Received, Rsyslog};
use tokio::sync::watch;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

struct Setup {
    _db: dalp_testkit::TestDb,
    pools: ComponentPools,
    sealer: Sealer,
    dir: tempfile::TempDir,
    rsyslog: Rsyslog,
    /// Events written so far.
    written: i64,
}

impl Setup {
    async fn new() -> Setup {
        let db = dalp_testkit::migrated_database(&SCHEMAS).await;
        let pools = db.pools();
        let dir = dalp_testkit::server_dir("dalp-siem-");
        let key = Arc::new(AuditKey::open_or_create(&dir.path().join("audit.json")).unwrap());
        let sealer = Sealer::new(pools.get(Component::AuditSealer).clone(), key);
        let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), &dir.path().join("tls"));
        Setup {
            _db: db,
            pools,
            sealer,
            dir,
            rsyslog,
            written: 0,
        }
    }

    /// Writes `n` events (outcomes cycling success, denied, error) and seals them.
    async fn write_sealed(&mut self, n: usize) {
        let w = self.pools.get(Component::Identity).get().await.unwrap();
        for i in 0..n {
            let outcome = [Outcome::Success, Outcome::Denied, Outcome::Error][i % 3];
            dalp_audit::record(
                &**w,
                &AuditEvent::new("service:test", "test.siem", "thing")
                    .resource(self.written)
                    .outcome(outcome),
            )
            .await
            .unwrap();
            self.written += 1;
        }
        self.sealer
            .seal_caught_up(Duration::from_secs(60))
            .await
            .unwrap();
    }

    fn forwarder(&self, target: &str, batch: i64) -> Arc<Forwarder> {
        let port = if target == "relp" {
            self.rsyslog.relp_port
        } else {
            self.rsyslog.syslog_port
        };
        Arc::new(Forwarder {
            pool: self.pools.get(Component::AuditSealer).clone(),
            name: format!("{target}-test"),
            framer: Framer::new(Format::Rfc5424, "dalp-test", DEFAULT_SD_ID, 8192).unwrap(),
            target: SyslogTarget::parse(&format!("{target}+tls://localhost:{port}")).unwrap(),
            tls: self.tls(),
            batch,
            pace: Duration::from_millis(5),
            pgaudit_dir: None,
            settle: Duration::from_millis(500),
        })
    }

    /// The receiver's CA and a client certificate it signed (imrelp requires one).
    fn tls(&self) -> SiemTls {
        let tls = self.dir.path().join("tls");
        let (cert, key) = (tls.join("forwarder.crt"), tls.join("forwarder.key"));
        if !cert.exists() {
            let (_, pem, key_pem) = dalp_ops::pki::issue_client(
                &tls,
                "dalp-forwarder",
                "siem-test",
                chrono::Duration::days(1),
            )
            .unwrap();
            std::fs::write(&cert, pem).unwrap();
            std::fs::write(&key, key_pem).unwrap();
        }
        SiemTls {
            ca_file: tls.join("ca.crt"),
            client: Some((cert, key)),
        }
    }

    /// How often each sequence number arrived.
    fn counts(&self) -> BTreeMap<i64, usize> {
        let mut m = BTreeMap::new();
        for r in self.rsyslog.received() {
            if let Some(s) = r.seq() {
                *m.entry(s).or_insert(0) += 1;
            }
        }
        m
    }

    /// Waits (up to 60 s) until every written event arrived; panics naming the missing.
    async fn wait_all_delivered(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counts = self.counts();
            let missing: Vec<i64> = (1..=self.written)
                .filter(|s| !counts.contains_key(s))
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} events never arrived, e.g. {:?}",
                missing.len(),
                self.written,
                &missing[..missing.len().min(20)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Seals 1,500 more events and, once 200 of them arrived, stops the receiver with
    /// `stop`, starts it again and waits until every event arrived.
    async fn interrupt_mid_stream(&mut self, stop: fn(&mut Rsyslog)) {
        let before = self.rsyslog.received().len();
        self.write_sealed(1500).await;
        self.wait_received(before + 200).await;
        stop(&mut self.rsyslog);
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.rsyslog.restart();
        self.wait_all_delivered().await;
    }

    /// Waits until at least `n` messages arrived.
    async fn wait_received(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.rsyslog.received().len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} messages arrived; rsyslog said: {}",
                self.rsyslog.internal_log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs the forwarder; `stop` ends it with an orderly close.
fn run(f: Arc<Forwarder>) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (tx, stop) = watch::channel(false);
    let task = tokio::spawn(async move {
        f.run(stop, |p| {
            if let Progress::Problem { message, .. } = p {
                eprintln!("forwarder: {message}");
            }
        })
        .await
        .unwrap()
    });
    (tx, task)
}

/// Waits until the forwarder's durable cursor reaches `seq`.
async fn wait_cursor(f: &Forwarder, seq: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.cursor().await.unwrap() < seq {
        assert!(Instant::now() < deadline, "the cursor stayed below {seq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_delivery_survives_receiver_stops_restarts_and_resets() {
    let mut s = Setup::new().await;
    s.write_sealed(60).await;
    let f = s.forwarder("syslog", 20);
    let (stop, task) = run(f.clone());
    s.wait_all_delivered().await;
    wait_cursor(&f, 60).await;

    // 1. The receiver stops while the forwarder is idle (it closes the connection); new
    //    events are sealed meanwhile; it comes back.
    s.rsyslog.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.write_sealed(40).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.rsyslog.restart();
    s.wait_all_delivered().await;

    // 2. Stopped and restarted mid-stream.
    s.interrupt_mid_stream(Rsyslog::stop).await;
    // 3. Killed mid-stream: the connection is reset, whatever it had not read is lost.
    s.interrupt_mid_stream(Rsyslog::kill).await;
    wait_cursor(&f, s.written).await;

    stop.send(true).unwrap();
    task.await.unwrap();
    let counts = s.counts();
    let dupes: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "{} events, {} messages received, {dupes} duplicates",
        s.written,
        s.rsyslog.received().len()
    );
    assert_eq!(counts.len() as i64, s.written, "events outside 1..=written");
    assert_eq!(f.cursor().await.unwrap(), s.written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relp_delivery_is_acknowledged_and_survives_a_restart_mid_stream() {
    let mut s = Setup::new().await;
    s.write_sealed(1500).await;
    let f = s.forwarder("relp", 50);
    let (stop, task) = run(f.clone());
    s.wait_received(300).await;
    s.rsyslog.stop();
    // Nothing past what rsyslog acknowledged (and, stopping cleanly, wrote) is recorded.
    let held = s.counts().keys().copied().collect::<Vec<_>>();
    let cursor = f.cursor().await.unwrap();
    assert!(
        (1..=cursor).all(|q| held.binary_search(&q).is_ok()),
        "cursor {cursor} is past what the receiver has"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.rsyslog.restart();
    s.wait_all_delivered().await;
    // RELP needs no settle time: the cursor follows the acknowledgements.
    wait_cursor(&f, s.written).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(
        !s.rsyslog.internal_log().contains("error"),
        "{}",
        s.rsyslog.internal_log()
    );
}

/// The messages of one export in `format` as rsyslog parsed them, sent the way
/// `dalp audit export --to syslog+tls://…` sends them, with an orderly close.
async fn export_to_rsyslog(s: &Setup, format: Format) -> Vec<Received> {
    let framer = Framer::new(format, "bank-host-1", "acme@99999", 8192).unwrap();
    let target =
        SyslogTarget::parse(&format!("syslog+tls://localhost:{}", s.rsyslog.syslog_port)).unwrap();
    let mut sink = SyslogSink::connect(&target, &SiemTls::ca(s.dir.path().join("tls/ca.crt")))
        .await
        .unwrap();
    let c = s.pools.get(Component::AuditSealer).get().await.unwrap();
    let events = read_sealed(&c, 0, None, 1000).await.unwrap();
    let before = s.rsyslog.received().len();
    let messages: Vec<String> = events.iter().map(|e| framer.event(e)).collect();
    sink.send(&messages).await.unwrap();
    assert!(sink.close().await, "rsyslog did not answer close_notify");
    s.wait_received(before + events.len()).await;
    s.rsyslog.received()[before..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cef_and_json_bodies_are_parsed_with_host_time_and_severity_and_closed_properly() {
    let mut s = Setup::new().await;
    s.write_sealed(9).await;
    let c = s.pools.get(Component::AuditSealer).get().await.unwrap();
    let events = read_sealed(&c, 0, None, 1000).await.unwrap();
    for format in [Format::Cef, Format::Jsonl, Format::Rfc5424] {
        let got = export_to_rsyslog(&s, format).await;
        assert_eq!(got.len(), events.len(), "{format:?}");
        for (r, e) in got.iter().zip(&events) {
            assert_eq!(r.hostname, "bank-host-1", "{r:?}");
            assert_eq!(r.app_name, "dalp", "{r:?}");
            assert_eq!(r.msgid, "audit", "{r:?}");
            assert_eq!(r.facility, 13, "log audit: {r:?}");
            let want = match e.outcome.as_str() {
                "success" => 6,
                "denied" => 4,
                _ => 3,
            };
            assert_eq!(r.severity, want, "{} → {r:?}", e.outcome);
            let t = chrono::DateTime::parse_from_rfc3339(&r.time).unwrap();
            assert_eq!(t, e.occurred_at, "{r:?}");
            assert!(r.structured_data.starts_with("[acme@99999 "), "{r:?}");
            assert_eq!(r.seq(), Some(e.seq));
            assert_eq!(r.sd_param("outcome"), Some(e.outcome.as_str()));
            match format {
                Format::Cef => {
                    assert!(r.msg.starts_with("CEF:0|dalp|dalp|"), "{r:?}");
                    assert!(r.msg.contains(&format!("externalId={}", e.seq)), "{r:?}");
                }
                Format::Jsonl => {
                    let v: serde_json::Value = serde_json::from_str(&r.msg).unwrap();
                    assert_eq!(v["seq"], e.seq);
                }
                _ => {
                    let v: serde_json::Value = serde_json::from_str(&r.msg).unwrap();
                    assert_eq!(v, e.details);
                }
            }
        }
    }
    let internal = s.rsyslog.internal_log();
    assert!(
        !internal.contains("non-properly terminated"),
        "rsyslog saw a session end without close_notify: {internal}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_ca_did_not_sign_is_named_as_such() {
    let s = Setup::new().await;
    let other = s.dir.path().join("other-ca");
    dalp_ops::pki::ensure(&other, &dalp_ops::process::ServerUser::resolve().unwrap()).unwrap();
    let target =
        SyslogTarget::parse(&format!("syslog+tls://localhost:{}", s.rsyslog.syslog_port)).unwrap();
    let err = SyslogSink::connect(&target, &SiemTls::ca(other.join("ca.crt")))
        .await
        .err()
        .expect("connected with the wrong CA");
    assert!(
        matches!(err, dalp_audit::export::ExportError::Certificate(_)),
        "{err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
    // A CA bundle that cannot be read is a configuration error, fatal for the forwarder.
    let err = SyslogSink::connect(&target, &SiemTls::ca(s.dir.path().join("missing.crt")))
        .await
        .err()
        .expect("no CA file");
    assert!(err.is_fatal(), "{err}");
}

/// Forwarding throughput with the acknowledgement path on, against rsyslog, from a backlog
/// of 100k sealed events (a benchmark: `cargo test --release -p dalp-audit --test siem --
/// --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn forwarding_throughput_from_a_backlog() {
    let n: usize = std::env::var("DALP_SIEM_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut s = Setup::new().await;
    s.write_sealed(n).await;
    // Baseline: the same messages, framed beforehand, written over one syslog/TLS
    // connection in a single send (no database reads, no cursor, no per-batch wait).
    let framer = Framer::new(Format::Rfc5424, "dalp-test", DEFAULT_SD_ID, 8192).unwrap();
    let c = s.pools.get(Component::AuditSealer).get().await.unwrap();
    let mut messages = Vec::with_capacity(n);
    let mut after = 0;
    loop {
        let page = read_sealed(&c, after, None, 10_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        messages.extend(page.iter().map(|e| framer.event(e)));
    }
    drop(c);
    let target =
        SyslogTarget::parse(&format!("syslog+tls://localhost:{}", s.rsyslog.syslog_port)).unwrap();
    let before = s.rsyslog.received().len();
    let t = Instant::now();
    let mut sink = SyslogSink::connect(&target, &s.tls()).await.unwrap();
    sink.send(&messages).await.unwrap();
    s.wait_received(before + n).await;
    let secs = t.elapsed().as_secs_f64();
    assert!(sink.close().await);
    eprintln!(
        "baseline, one write of pre-framed messages: {n} events in {secs:.2} s = {:.0} events/s",
        n as f64 / secs
    );
    for target in ["syslog", "relp"] {
        let f = Arc::new(Forwarder {
            pace: Duration::ZERO,
            ..Arc::try_unwrap(s.forwarder(target, 500)).ok().unwrap()
        });
        let before = s.rsyslog.received().len();
        let t = Instant::now();
        let (stop, task) = run(f.clone());
        s.wait_received(before + n).await;
        let secs = t.elapsed().as_secs_f64();
        wait_cursor(&f, n as i64).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        eprintln!(
            "{target}+tls: {n} events in {secs:.2} s = {:.0} events/s (received by rsyslog)",
            n as f64 / secs
        );
    }
}
