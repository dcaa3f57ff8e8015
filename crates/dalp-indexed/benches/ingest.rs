//! `cargo bench -p dalp-indexed --bench ingest`
//!
//! One run, three ways of writing the same synthetic chain (1,000 accounts, 1,000 ERC-20
//! transfers per block, 1,000,000 transfers by default; `DALP_BENCH_TRANSFERS` changes it),
//! each into a fresh migrated database of the same cluster:
//!
//! 1. **ingest**: `IndexedStore::ingest`, batches of 20 blocks: decoding, balance and supply
//!    computation, binary COPY, balance upsert, checkpoint, audit record, one transaction
//!    per batch.
//! 2. **raw COPY** (the goal's baseline): the rows the ingest path wrote, dumped with
//!    `COPY ... TO STDOUT (FORMAT binary)` beforehand, loaded with binary `COPY FROM` into the
//!    same tables of a fresh database in the same 20-block batches, one transaction each;
//!    only the load is timed.
//! 3. **row-by-row INSERT**: the ingest path with one prepared INSERT per row instead of COPY,
//!    on the first `DALP_BENCH_ROW_TRANSFERS` (default 20,000) transfers (it is slow);
//!    compared by throughput.
//!
//! Then a 64-block reorg on the full database: rewind (rollback) and re-apply timed apart.

use std::time::Instant;

use bytes::Bytes;
use chrono::{Datelike, TimeZone, Utc};
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_indexed::store::WriteMode;
use dalp_indexed::synth::Synth;
use dalp_indexed::IndexedStore;
use futures_util::{SinkExt, TryStreamExt};

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_indexed::MIGRATIONS, dalp_audit::MIGRATIONS];

const CHAIN: i64 = 1;
const PER_BLOCK: usize = 1000;
const BATCH_BLOCKS: i64 = 20;
const TABLES: [(&str, &str); 7] = [
    ("blocks", "chain_id, number, hash, parent_hash, block_time, tx_count, log_count"),
    ("transactions", "chain_id, block_number, block_time, tx_index, hash, from_address, to_address, status"),
    ("logs", "chain_id, block_number, block_time, log_index, tx_hash, tx_index, address, topic0, topic1, topic2, topic3, data, event, decoded"),
    ("transfers", "chain_id, block_number, block_time, log_index, tx_hash, token, from_address, to_address, value"),
    ("balance_history", "chain_id, token, account, block_number, block_time, balance"),
    ("balances", "chain_id, token, account, balance, block_number"),
    ("supply_history", "chain_id, token, block_number, total_supply"),
];

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn fresh_store(mode: WriteMode) -> (dalp_testkit::TestDb, IndexedStore) {
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let store =
        IndexedStore::new(db.pools_sized(2).get(Component::Indexer).clone()).with_write_mode(mode);
    store
        .register_chain(&RequestContext::service("bench"), CHAIN, "bench", 64)
        .await
        .unwrap();
    (db, store)
}

/// Ingests blocks `0..=last` in batches; returns (seconds, transfers).
async fn ingest(store: &IndexedStore, synth: &Synth, last: i64) -> (f64, usize) {
    let ctx = RequestContext::service("bench");
    let mut transfers = 0;
    let started = Instant::now();
    let mut from = 0;
    while from <= last {
        let to = (from + BATCH_BLOCKS - 1).min(last);
        let blocks = synth.blocks(from, to, 0);
        let out = store.ingest(&ctx, CHAIN, &blocks, None).await.unwrap();
        transfers += out.transfers;
        from = to + 1;
    }
    (started.elapsed().as_secs_f64(), transfers)
}

/// Vacuums and analyses `db` (so autovacuum of what one phase wrote does not run during
/// the next), then flushes dirty buffers.
async fn settle(db: &dalp_testkit::TestDb) {
    db.superuser()
        .await
        .batch_execute("VACUUM (ANALYZE) ")
        .await
        .unwrap();
    checkpoint().await;
}

/// Flushes dirty buffers so one phase's writes are not paid for by the next.
async fn checkpoint() {
    dalp_testkit::superuser("postgres")
        .await
        .batch_execute("CHECKPOINT")
        .await
        .unwrap();
}

async fn total_rows(db: &dalp_testkit::TestDb) -> i64 {
    let su = db.superuser().await;
    let mut n = 0;
    for (t, _) in TABLES {
        n += su
            .query_one(&format!("SELECT count(*) FROM dalp_indexed.{t}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    n
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let want = env_usize("DALP_BENCH_TRANSFERS", 1_000_000);
    let row_subset = env_usize("DALP_BENCH_ROW_TRANSFERS", 20_000);
    let last = (want / PER_BLOCK) as i64;
    let now = Utc::now();
    // Inside the current month, whose partitions the migrations created.
    let genesis = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let synth = Synth::new(1000, PER_BLOCK, genesis);
    println!("synthetic chain: blocks 0..={last}, {PER_BLOCK} transfers per block, 1000 accounts");

    // 1. Our ingest path.
    let (db_a, store_a) = fresh_store(WriteMode::Copy).await;
    checkpoint().await;
    let (secs, transfers) = ingest(&store_a, &synth, last).await;
    let rows = total_rows(&db_a).await;
    let ours = transfers as f64 / secs;
    println!(
        "ingest path:     {transfers} transfers ({rows} rows) in {secs:.2} s = {ours:.0} transfers/s"
    );

    // 2. Raw binary COPY of the same rows into the same tables of a fresh database, in the
    //    same batches (one transaction per 20 blocks; current balances with the last batch).
    let src = db_a.superuser().await;
    let mut batches: Vec<Vec<(&str, &str, Vec<Bytes>)>> = Vec::new();
    let mut from = 0;
    while from <= last {
        let to = (from + BATCH_BLOCKS - 1).min(last);
        let mut dumps = Vec::new();
        for (t, cols) in TABLES {
            let cond = match t {
                "blocks" => format!("number BETWEEN {from} AND {to}"),
                "balances" if to == last => "true".to_string(),
                "balances" => continue,
                _ => format!("block_number BETWEEN {from} AND {to}"),
            };
            let stream = src
                .copy_out(&format!(
                    "COPY (SELECT {cols} FROM dalp_indexed.{t} WHERE chain_id = {CHAIN} AND {cond}) TO STDOUT (FORMAT binary)"
                ))
                .await
                .unwrap();
            // COPY TO sends one message per row; regroup into 256 KiB pieces so the load
            // is not a flush per row.
            let rows: Vec<Bytes> = stream.try_collect().await.unwrap();
            let all: Vec<u8> = rows.concat();
            let chunks: Vec<Bytes> = all.chunks(256 * 1024).map(Bytes::copy_from_slice).collect();
            dumps.push((t, cols, chunks));
        }
        batches.push(dumps);
        from = to + 1;
    }
    let (db_b, _store_b) = fresh_store(WriteMode::Copy).await;
    let mut dst = db_b.connect(Component::Indexer.role()).await;
    settle(&db_a).await;
    let started = Instant::now();
    for dumps in &batches {
        let tx = dst.transaction().await.unwrap();
        for (t, cols, chunks) in dumps {
            let sink = tx
                .copy_in::<_, Bytes>(&format!(
                    "COPY dalp_indexed.{t} ({cols}) FROM STDIN (FORMAT binary)"
                ))
                .await
                .unwrap();
            futures_util::pin_mut!(sink);
            for c in chunks {
                sink.send(c.clone()).await.unwrap();
            }
            sink.close().await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let raw_secs = started.elapsed().as_secs_f64();
    assert_eq!(
        total_rows(&db_b).await,
        rows,
        "raw COPY loaded the same rows"
    );
    let raw = transfers as f64 / raw_secs;
    println!(
        "raw binary COPY: {transfers} transfers ({rows} rows) in {raw_secs:.2} s = {raw:.0} transfers/s"
    );
    drop(dst);

    // 3. Row-by-row INSERT of the same kind of rows, on a prefix.
    let (_db_c, store_c) = fresh_store(WriteMode::RowByRow).await;
    let row_last = (row_subset / PER_BLOCK) as i64;
    settle(&db_b).await;
    let (row_secs, row_transfers) = ingest(&store_c, &synth, row_last).await;
    let row = row_transfers as f64 / row_secs;
    println!(
        "row-by-row:      {row_transfers} transfers in {row_secs:.2} s = {row:.0} transfers/s"
    );

    println!("ingest / raw COPY   = {:.2}x (goal >= 0.7x)", ours / raw);
    println!("ingest / row-by-row = {:.1}x (goal >= 5x)", ours / row);

    // 4. A 64-block reorg on the full database.
    let ctx = RequestContext::service("bench");
    let fork = last - 64;
    checkpoint().await;
    let started = Instant::now();
    let r = store_a.rewind(&ctx, CHAIN, fork).await.unwrap();
    let rollback = started.elapsed().as_secs_f64();
    assert_eq!(r.depth, 64);
    let branch = synth.clone().on_branch(1).blocks(fork + 1, last, 0);
    let started = Instant::now();
    store_a
        .ingest(&ctx, CHAIN, &branch[..32], None)
        .await
        .unwrap();
    store_a
        .ingest(&ctx, CHAIN, &branch[32..], None)
        .await
        .unwrap();
    let apply = started.elapsed().as_secs_f64();
    println!(
        "64-block reorg on {transfers} transfers: rollback {:.0} ms ({} transfers removed), apply new branch {:.0} ms",
        rollback * 1000.0,
        64 * PER_BLOCK,
        apply * 1000.0
    );
}
