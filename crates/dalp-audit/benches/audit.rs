//! `cargo bench -p dalp-audit --bench audit`
//!
//! Sustained audit events/second from 8 concurrent writers (one event per transaction, as
//! a domain write would), first with no sealer (the baseline: plain INSERT), then with the
//! sealer running every 200 ms as `dalp up` does, each on a fresh database, in one run.
//! Seal lag (age of the oldest committed but unsealed event) is sampled every 50 ms during
//! the sealed run; p50/p99 are printed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_audit::{AuditEvent, AuditKey, Sealer};
use dalp_db::Component;

const WRITERS: usize = 8;
const SECONDS: u64 = 8;

async fn run(sealing: bool) -> (f64, Vec<f64>, u64) {
    let db = dalp_testkit::migrated_database().await;
    let pools = Arc::new(db.pools_sized(WRITERS + 2));
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(AuditKey::open_or_create(&dir.path().join("k.json")).unwrap());
    let sealer_task = sealing.then(|| {
        Sealer::new(pools.get(Component::AuditSealer).clone(), key.clone())
            .spawn(Duration::from_millis(200))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (pools, stop, count) = (pools.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let c = pools.get(Component::Identity).get().await.unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let e = AuditEvent::new(format!("service:bench{w}"), "bench.write", "thing")
                    .resource(i)
                    .details(serde_json::json!({ "n": i, "writer": w }));
                dalp_audit::record(&**c, &e).await.unwrap();
                i += 1;
            }
            count.fetch_add(i, Ordering::Relaxed);
        }));
    }
    let mut lags = Vec::new();
    let started = Instant::now();
    let lag_pool = pools.get(Component::AuditSealer).clone();
    while started.elapsed() < Duration::from_secs(SECONDS) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if sealing {
            lags.push(Sealer::lag(&lag_pool).await.unwrap());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = count.load(Ordering::Relaxed);
    let mut sealed = 0;
    if let Some(t) = sealer_task {
        // Let the sealer catch up, then check it sealed everything.
        tokio::time::sleep(Duration::from_millis(600)).await;
        t.abort();
        let su = db.superuser().await;
        sealed = su
            .query_one(
                "SELECT coalesce(max(last_seq), 0) FROM dalp_audit.seal_batches",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0) as u64;
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (total as f64 / elapsed, lags, sealed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (plain, _, _) = run(false).await;
        let (sealed_rate, lags, sealed) = run(true).await;
        let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p).round() as usize];
        println!("audit events, {WRITERS} concurrent writers, one event per transaction, {SECONDS} s each:");
        println!("  plain INSERT, no sealing   {plain:>9.0} events/s");
        println!("  with sealing (200 ms)      {sealed_rate:>9.0} events/s  ({sealed} sealed)");
        println!("  ratio sealed/plain         {:>9.2}x   (goal: >= 0.5x)", sealed_rate / plain);
        println!(
            "  seal lag over {} samples   p50 {:.3} s   p99 {:.3} s   max {:.3} s   (goal: p99 <= 1 s)",
            lags.len(),
            pct(0.5),
            pct(0.99),
            lags.last().copied().unwrap_or(0.0)
        );
    });
}
