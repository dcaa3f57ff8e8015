//! `cargo bench -p dalp-audit --bench verify` (DALP_VERIFY_EVENTS, default 1,000,000)
//!
//! Full verification throughput of a sealed chain, and the time of an incremental one after
//! 10,000 new events, both as `dalp audit verify` runs them (the auditor role, the public key,
//! every witnessed head). The events are written by the identity writer in transactions of
//! 5,000 rows (through the metadata trigger) and sealed first; writing and sealing rates are
//! printed too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_audit::{verify_with, AuditKey, Sealer, TrustedKeys, VerifyOptions, Witness};
use dalp_db::Component;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

const TX_ROWS: i64 = 5_000;

async fn write(db: &dalp_testkit::TestDb, n: i64) {
    let c = db.connect_as(Component::Identity).await;
    let mut done = 0;
    while done < n {
        let rows = TX_ROWS.min(n - done);
        c.execute(
            "INSERT INTO dalp_audit.events (actor, action, resource_type, resource_id, outcome, details)
             SELECT 'service:bench', 'bench.write', 'thing', g::text, 'success', jsonb_build_object('n', g)
               FROM generate_series($1::bigint, $2::bigint) g",
            &[&done, &(done + rows - 1)],
        )
        .await
        .unwrap();
        done += rows;
    }
}

fn main() {
    let n: i64 = std::env::var("DALP_VERIFY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = dalp_testkit::migrated_database(&SCHEMAS).await;
        let pools = db.pools();
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(AuditKey::open_or_create(&dir.path().join("k.json")).unwrap());
        let witness = Witness::new(dir.path().join("witness"));
        let sealer = Sealer::new(pools.get(Component::AuditSealer).clone(), key.clone())
            .with_witness(witness.clone(), Duration::ZERO);

        let t = Instant::now();
        write(&db, n).await;
        let write_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        sealer
            .seal_caught_up(Duration::from_secs(3600))
            .await
            .unwrap();
        sealer.witness_now().await.unwrap();
        let seal_s = t.elapsed().as_secs_f64();

        let keys = TrustedKeys::one(key.public());
        let auditor = db.connect_as(Component::Auditor).await;
        let heads = witness.heads().unwrap();
        let t = Instant::now();
        let full = verify_with(
            &auditor,
            &VerifyOptions {
                heads: &heads,
                ..VerifyOptions::new(&keys)
            },
        )
        .await
        .unwrap();
        let full_s = t.elapsed().as_secs_f64();
        assert!(full.ok(), "{:?}", full.problem);
        assert_eq!(full.events_checked as i64, n);
        let anchor = Sealer::checkpoint_of(&auditor, full.last_batch)
            .await
            .unwrap()
            .unwrap();

        write(&db, 10_000).await;
        sealer
            .seal_caught_up(Duration::from_secs(600))
            .await
            .unwrap();
        sealer.witness_now().await.unwrap();
        let heads = witness.heads().unwrap();
        let t = Instant::now();
        let inc = verify_with(
            &auditor,
            &VerifyOptions {
                heads: &heads,
                after: Some(&anchor),
                ..VerifyOptions::new(&keys)
            },
        )
        .await
        .unwrap();
        let inc_s = t.elapsed().as_secs_f64();
        assert!(inc.ok(), "{:?}", inc.problem);
        assert_eq!(inc.events_checked, 10_000);

        println!("audit chain of {n} events ({} batches):", full.batches);
        println!(
            "  write (5,000 rows a transaction)  {:>9.0} events/s  ({write_s:.1} s)",
            n as f64 / write_s
        );
        println!(
            "  seal                              {:>9.0} events/s  ({seal_s:.1} s)",
            n as f64 / seal_s
        );
        println!(
            "  full verify                       {:>9.0} events/s  ({full_s:.2} s; goal >= 100k/s)",
            n as f64 / full_s
        );
        println!("  incremental verify, 10,000 new    {inc_s:>9.3} s        (goal < 1 s)");
    });
}
