//! `cargo bench -p dalp-indexed --bench follow`
//!
//! The follower against a real node (anvil), in one run on one chain:
//!
//! 1. **fetch only** (the ceiling): the follower's own fetch of every batch — blocks with
//!    their transactions, the token's logs, receipts where needed — parsed, written nowhere.
//! 2. **follow, one batch at a time** (the baseline, how the follower worked before): fetch,
//!    then write, then fetch the next.
//! 3. **follow, pipelined** (the product): the next batch is fetched while the previous one
//!    is written.
//!
//! Each follow starts from an empty, freshly migrated database and ends when the checkpoint
//! reaches the node's head; the result is checked (every block and log indexed).
//!
//! `DALP_BENCH_CLI=name=/path/to/dalp,...` also times `dalp index follow --once` of each
//! named binary on the same chain (e.g. a build of an older commit, for "today's rate").
//! The chain: `DALP_BENCH_BLOCKS` (default 2,500) blocks of `DALP_BENCH_PER_BLOCK` (6)
//! ERC-20 transfers among 10 accounts, made before timing starts.
//!
//! `DALP_BENCH_SCHEMA_SQL` (statements, run as the superuser on every fresh database after
//! the migrations) measures a schema change without a migration, e.g.
//! `DROP INDEX dalp_indexed.logs_address_idx`.

use std::time::{Duration, Instant};

use dalp_db::Component;
use dalp_indexed::follow::{FollowOptions, Follower};
use dalp_indexed::rpc::RpcClient;
use dalp_indexed::types::parse_address;
use dalp_indexed::IndexedStore;
use dalp_testkit::anvil::Anvil;
use serde_json::json;
use sha3::{Digest, Keccak256};

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_indexed::MIGRATIONS, dalp_audit::MIGRATIONS];

const CHAIN: i64 = 31337;
static BATCH: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(|| env_u64("DALP_BENCH_BATCH", 100));
const TOKEN_BIN: &str = include_str!("../tests/contracts/DalpTestToken.bin");

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time, in seconds, from /proc (`USER_HZ` ticks: 100 on Linux): the whole machine's
/// busy time (every core, all processes), this process's and the node's.
#[derive(Clone, Copy)]
struct Cpu {
    machine: f64,
    follower: f64,
    node: f64,
}

fn proc_ticks(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)
}

impl Cpu {
    fn now(node_pid: u32) -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let line = stat.lines().next().unwrap_or("");
        // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        let busy: f64 = v
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
            .map(|(_, x)| x)
            .sum();
        Cpu {
            machine: busy / 100.0,
            follower: proc_ticks("self") / 100.0,
            node: proc_ticks(&node_pid.to_string()) / 100.0,
        }
    }

    /// "cpu: node N s, follower F s, the rest (PostgreSQL) P s; machine busy B% of 2 cores".
    fn since(self, before: Cpu, wall: f64) -> String {
        let machine = self.machine - before.machine;
        let node = self.node - before.node;
        let follower = self.follower - before.follower;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "cpu: node {node:.2} s, follower {follower:.2} s, rest (PostgreSQL) {:.2} s; machine {:.0}% busy of {cores} cores",
            (machine - node - follower).max(0.0),
            100.0 * machine / (wall * cores)
        )
    }
}

fn call_data(sig: &str, addr: &str, amount: u64) -> String {
    format!(
        "0x{}{:0>64}{amount:064x}",
        hex::encode(&Keccak256::digest(sig.as_bytes())[..4]),
        addr.trim_start_matches("0x")
    )
}

/// Deploys the token, mints to 10 accounts, then `blocks` blocks of `per_block` transfers.
/// Returns the token address.
async fn build_chain(rpc: &RpcClient, blocks: u64, per_block: u64) -> String {
    let accounts: Vec<String> = rpc
        .call("eth_accounts", json!([]))
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let send = |from: &str, to: Option<&str>, data: String| {
        let mut tx = json!({"from": from, "data": data, "gas": "0x500000"});
        if let Some(to) = to {
            tx["to"] = json!(to);
        }
        rpc.call("eth_sendTransaction", json!([tx]))
    };
    let hash = send(&accounts[0], None, format!("0x{}", TOKEN_BIN.trim()))
        .await
        .unwrap();
    let mut receipt = serde_json::Value::Null;
    while receipt.is_null() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        receipt = rpc
            .call("eth_getTransactionReceipt", json!([hash]))
            .await
            .unwrap();
    }
    let token = receipt["contractAddress"].as_str().unwrap().to_string();
    for a in &accounts {
        send(
            &accounts[0],
            Some(&token),
            call_data("mint(address,uint256)", a, 1_000_000_000),
        )
        .await
        .unwrap();
    }
    rpc.call("evm_setAutomine", json!([false])).await.unwrap();
    let mut k = 0usize;
    for b in 0..blocks {
        for _ in 0..per_block {
            let from = &accounts[k % accounts.len()];
            let to = &accounts[(k * 7 + 3) % accounts.len()];
            send(
                from,
                Some(&token),
                call_data("transfer(address,uint256)", to, 1 + k as u64 % 1000),
            )
            .await
            .unwrap();
            k += 1;
        }
        rpc.call("evm_mine", json!([])).await.unwrap();
        if b % 500 == 499 {
            println!("  built {} blocks", b + 1);
        }
    }
    token
}

fn options(token: &str, pipeline: bool, receipts: bool) -> FollowOptions {
    let mut o = FollowOptions::new(CHAIN);
    o.block_receipts = receipts;
    o.contracts = vec![parse_address("token", "bench", token).unwrap()];
    o.batch_blocks = *BATCH;
    o.until_caught_up = true;
    o.give_up_after = Some(3);
    o.pipeline = pipeline;
    o
}

/// A fresh migrated database with `DALP_BENCH_SCHEMA_SQL` applied.
async fn bench_database() -> dalp_testkit::TestDb {
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    if let Ok(sql) = std::env::var("DALP_BENCH_SCHEMA_SQL") {
        db.superuser()
            .await
            .batch_execute(&sql)
            .await
            .expect("DALP_BENCH_SCHEMA_SQL");
    }
    db
}

/// Follows into a fresh database; returns (seconds, blocks, logs, transfers, CPU line).
async fn follow(
    anvil: &Anvil,
    token: &str,
    pipeline: bool,
    receipts: bool,
) -> (f64, i64, i64, i64, String) {
    let db = bench_database().await;
    let store = IndexedStore::new(db.pools_sized(2).get(Component::Indexer).clone());
    store
        .register_chain(
            &dalp_audit::RequestContext::service("bench"),
            CHAIN,
            "anvil",
            64,
        )
        .await
        .unwrap();
    let rpc = RpcClient::new(&anvil.url()).unwrap();
    let follower = Follower::new(&store, rpc, options(token, pipeline, receipts));
    let cpu = Cpu::now(anvil.pid());
    let started = Instant::now();
    follower
        .run(|_| {}, std::future::pending::<()>())
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let cpu = Cpu::now(anvil.pid()).since(cpu, secs);
    let counts: std::collections::HashMap<String, i64> =
        store.counts(CHAIN).await.unwrap().into_iter().collect();
    (
        secs,
        counts["blocks"],
        counts["logs"],
        counts["transfers"],
        cpu,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let blocks = env_u64("DALP_BENCH_BLOCKS", 2500);
    let per_block = env_u64("DALP_BENCH_PER_BLOCK", 6);
    let anvil = Anvil::start(CHAIN as u64);
    let rpc = RpcClient::new(&anvil.url()).unwrap();
    let built = Instant::now();
    let token = build_chain(&rpc, blocks, per_block).await;
    let head = rpc.block_number().await.unwrap();
    println!(
        "chain: {} blocks, {} transfers planned, built in {:.1} s",
        head + 1,
        blocks * per_block,
        built.elapsed().as_secs_f64()
    );

    // Where the fetch time goes: each request kind alone over the same ranges.
    {
        let contracts = vec![parse_address("token", "bench", &token).unwrap()];
        let mut ranges = Vec::new();
        let mut from = 0;
        while from <= head {
            let to = head.min(from + *BATCH - 1);
            ranges.push((from, to));
            from = to + 1;
        }
        let t = Instant::now();
        for &(a, b) in &ranges {
            rpc.blocks(a, b).await.unwrap();
        }
        let full = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for &(a, b) in &ranges {
            let calls: Vec<(&str, serde_json::Value)> = (a..=b)
                .map(|n| ("eth_getBlockByNumber", json!([format!("0x{n:x}"), false])))
                .collect();
            rpc.batch(&calls).await.unwrap();
        }
        let headers = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for &(a, b) in &ranges {
            rpc.logs(a, b, &contracts).await.unwrap();
        }
        let logs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for &(a, b) in &ranges {
            let calls: Vec<(&str, serde_json::Value)> = (a..=b)
                .map(|n| ("eth_getBlockReceipts", json!([format!("0x{n:x}")])))
                .collect();
            rpc.batch(&calls).await.unwrap();
        }
        let receipts = t.elapsed().as_secs_f64();
        println!(
            "fetch parts alone:     blocks with transactions {full:.2} s, headers only {headers:.2} s, logs {logs:.2} s, block receipts {receipts:.2} s"
        );
    }

    // Per fetch path: fetch only (same batches), then follow one batch at a time, then
    // pipelined.
    let mut summary = Vec::new();
    for (path, receipts) in [
        ("full blocks + eth_getLogs", false),
        ("block receipts", true),
    ] {
        let db = dalp_testkit::migrated_database(&SCHEMAS).await;
        let store = IndexedStore::new(db.pools_sized(1).get(Component::Indexer).clone());
        let fetcher = Follower::new(&store, rpc.clone(), options(&token, false, receipts));
        let cpu = Cpu::now(anvil.pid());
        let started = Instant::now();
        let mut fetched_blocks = 0usize;
        let mut logs = 0usize;
        let mut from = 0;
        while from <= head {
            let to = head.min(from + *BATCH - 1);
            let b = fetcher.fetch(from, to).await.unwrap();
            fetched_blocks += b.len();
            logs += b.iter().map(|b| b.logs.len()).sum::<usize>();
            from = to + 1;
        }
        let fetch_secs = started.elapsed().as_secs_f64();
        let cpu = Cpu::now(anvil.pid()).since(cpu, fetch_secs);
        drop(db);
        println!("{path}:");
        println!(
            "  fetch only            {fetched_blocks} blocks, {logs} logs in {fetch_secs:.2} s = {:.0} blocks/s",
            fetched_blocks as f64 / fetch_secs
        );
        println!("                        {cpu}");
        let mut results = Vec::new();
        for (name, pipeline) in [("one batch at a time", false), ("pipelined", true)] {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (secs, n, stored_logs, transfers, cpu) =
                follow(&anvil, &token, pipeline, receipts).await;
            assert_eq!(n as u64, head + 1, "every block indexed");
            assert_eq!(stored_logs as usize, logs, "every log indexed");
            println!(
                "  follow, {name:<20} {n} blocks, {transfers} transfers in {secs:.2} s = {:.0} blocks/s, {:.0} transfers/s",
                n as f64 / secs,
                transfers as f64 / secs
            );
            println!("                        {cpu}");
            results.push(secs);
        }
        summary.push(format!(
            "{path}: pipelined / fetch-only {:.2}x, pipelined / one batch at a time {:.2}x, pipelined {:.2} s",
            fetch_secs / results[1],
            results[0] / results[1],
            results[1]
        ));
    }
    for spec in std::env::var("DALP_BENCH_CLI")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (name, bin) = spec.split_once('=').expect("name=/path/to/dalp");
        let db = bench_database().await;
        let started = Instant::now();
        let out = std::process::Command::new(bin)
            .args(["index", "follow", "--once", "--rpc", &anvil.url()])
            .args(["--chain-id", &CHAIN.to_string(), "--contracts", &token])
            .args(["--batch", &BATCH.to_string()])
            .env(
                "DALP_DATABASE_URL",
                db.options(Component::Indexer.role()).to_url(),
            )
            .env_remove("DALP_DATA_DIR")
            .output()
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store = IndexedStore::new(db.pools_sized(1).get(Component::Indexer).clone());
        let counts: std::collections::HashMap<String, i64> =
            store.counts(CHAIN).await.unwrap().into_iter().collect();
        assert_eq!(counts["blocks"] as u64, head + 1);
        println!(
            "cli {name:<22} {} blocks, {} transfers in {secs:.2} s = {:.0} blocks/s, {:.0} transfers/s (process start included)",
            counts["blocks"],
            counts["transfers"],
            counts["blocks"] as f64 / secs,
            counts["transfers"] as f64 / secs
        );
    }
    for line in summary {
        println!("{line}");
    }
}
