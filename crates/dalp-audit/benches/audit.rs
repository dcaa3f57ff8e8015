//! `cargo bench -p dalp-audit --bench audit`
//!
//! Sustained audit events/second from 8 concurrent writers (one event per transaction, as
//! a domain write would), each on a fresh database, in one run: the baseline, a plain INSERT
//! into a table of the same columns with no trigger; then `dalp_audit.events` (the metadata
//! trigger) with no sealer; then with the sealer running every 200 ms as `dalp up` does.
//! Seal lag (age of the oldest committed but unsealed event) is sampled every 50 ms during
//! the sealed run; p50/p99 are printed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_audit::{AuditEvent, AuditKey, Sealer};
use dalp_db::Component;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

const WRITERS: usize = 8;
const SECONDS: u64 = 8;

const PLAIN_TABLE: &str = "CREATE TABLE public.bench_plain (
    id bigint GENERATED ALWAYS AS IDENTITY, occurred_at timestamptz NOT NULL DEFAULT now(),
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(), actor text NOT NULL, organisation_id uuid,
    action text NOT NULL, resource_type text NOT NULL, resource_id text, outcome text NOT NULL,
    request_id text, source_ip inet, details jsonb NOT NULL,
    PRIMARY KEY (id, occurred_at));
  GRANT INSERT ON public.bench_plain TO dalp_identity_svc";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Audit,
    Sealed,
}

async fn run(mode: Mode) -> (f64, Vec<f64>, u64) {
    let sealing = mode == Mode::Sealed;
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    if mode == Mode::Plain {
        db.superuser()
            .await
            .batch_execute(PLAIN_TABLE)
            .await
            .unwrap();
    }
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
                if mode == Mode::Plain {
                    c.execute(
                        "INSERT INTO public.bench_plain (actor, organisation_id, action, resource_type, resource_id, outcome, request_id, source_ip, details)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        &[&e.actor, &e.organisation_id, &e.action, &e.resource_type, &e.resource_id,
                          &e.outcome.as_str(), &e.request_id, &e.source_ip, &e.details],
                    )
                    .await
                    .unwrap();
                } else {
                    dalp_audit::record(&**c, &e).await.unwrap();
                }
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
        let (plain, _, _) = run(Mode::Plain).await;
        let (audit, _, _) = run(Mode::Audit).await;
        let (sealed_rate, lags, sealed) = run(Mode::Sealed).await;
        let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p).round() as usize];
        println!("audit events, {WRITERS} concurrent writers, one event per transaction, {SECONDS} s each:");
        println!("  plain INSERT, no trigger   {plain:>9.0} events/s");
        println!("  dalp_audit.events, no seal {audit:>9.0} events/s");
        println!("  with sealing (200 ms)      {sealed_rate:>9.0} events/s  ({sealed} sealed)");
        println!("  ratio sealed/plain         {:>9.2}x   (goal: >= 0.8x)", sealed_rate / plain);
        println!(
            "  seal lag over {} samples   p50 {:.3} s   p99 {:.3} s   max {:.3} s   (goal: p99 <= 1 s)",
            lags.len(),
            pct(0.5),
            pct(0.99),
            lags.last().copied().unwrap_or(0.0)
        );
    });
}
