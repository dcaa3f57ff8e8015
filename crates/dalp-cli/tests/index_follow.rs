//! `dalp index follow` against a real EVM node (anvil) and the real database: the indexed
//! balances and supply equal the contract's `balanceOf`/`totalSupply` at the head and at past
//! blocks, also after a reorg (anvil snapshot/revert) and after a kill -9 mid-stream.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dalp_db::Component;
use dalp_indexed::rpc::RpcClient;
use dalp_indexed::types::parse_address;
use dalp_indexed::IndexedStore;
use dalp_testkit::anvil::Anvil;
use dalp_testkit::{migrated_database, output_text, Reaped, TestDb};
use num_bigint::BigUint;
use serde_json::{json, Value};
use sha3::{Digest, Keccak256};

const DALP: &str = env!("CARGO_BIN_EXE_dalp");
const CHAIN: i64 = 31337;
const TOKEN_BIN: &str = include_str!("../../dalp-indexed/tests/contracts/DalpTestToken.bin");

fn selector(sig: &str) -> String {
    hex::encode(&Keccak256::digest(sig.as_bytes())[..4])
}

fn word_addr(a: &str) -> String {
    format!("{:0>64}", a.trim_start_matches("0x").to_ascii_lowercase())
}

fn word_u(v: u128) -> String {
    format!("{v:064x}")
}

struct Node {
    rpc: RpcClient,
    accounts: Vec<String>,
}

impl Node {
    async fn new(anvil: &Anvil) -> Node {
        let rpc = RpcClient::new(&anvil.url()).unwrap();
        let accounts = rpc.call("eth_accounts", json!([])).await.unwrap();
        let accounts = accounts
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_ascii_lowercase())
            .collect();
        Node { rpc, accounts }
    }

    /// Sends a transaction (auto-mined into its own block) and returns its receipt.
    async fn send(&self, from: usize, to: Option<&str>, data: String) -> Value {
        let mut tx =
            json!({"from": self.accounts[from], "data": format!("0x{data}"), "gas": "0x500000"});
        if let Some(to) = to {
            tx["to"] = json!(to);
        }
        let hash = self
            .rpc
            .call("eth_sendTransaction", json!([tx]))
            .await
            .unwrap();
        for _ in 0..200 {
            let r = self
                .rpc
                .call("eth_getTransactionReceipt", json!([hash]))
                .await
                .unwrap();
            if !r.is_null() {
                assert_eq!(r["status"], "0x1", "transaction failed: {r}");
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no receipt for {hash}");
    }

    async fn deploy(&self) -> String {
        let r = self.send(0, None, TOKEN_BIN.trim().to_string()).await;
        r["contractAddress"].as_str().unwrap().to_ascii_lowercase()
    }

    async fn mint(&self, token: &str, to: usize, v: u128) {
        let data = format!(
            "{}{}{}",
            selector("mint(address,uint256)"),
            word_addr(&self.accounts[to]),
            word_u(v)
        );
        self.send(0, Some(token), data).await;
    }

    async fn transfer(&self, token: &str, from: usize, to: usize, v: u128) {
        let data = format!(
            "{}{}{}",
            selector("transfer(address,uint256)"),
            word_addr(&self.accounts[to]),
            word_u(v)
        );
        self.send(from, Some(token), data).await;
    }

    async fn call_uint(&self, token: &str, data: String, block: u64) -> BigUint {
        let r = self
            .rpc
            .call(
                "eth_call",
                json!([{"to": token, "data": format!("0x{data}")}, format!("0x{block:x}")]),
            )
            .await
            .unwrap();
        let hex_digits = r.as_str().unwrap().trim_start_matches("0x");
        if hex_digits.is_empty() {
            return BigUint::default(); // no code yet at that block
        }
        BigUint::parse_bytes(hex_digits.as_bytes(), 16).unwrap()
    }

    async fn balance_of(&self, token: &str, account: usize, block: u64) -> BigUint {
        let data = format!(
            "{}{}",
            selector("balanceOf(address)"),
            word_addr(&self.accounts[account])
        );
        self.call_uint(token, data, block).await
    }

    async fn total_supply(&self, token: &str, block: u64) -> BigUint {
        self.call_uint(token, selector("totalSupply()"), block)
            .await
    }

    async fn head(&self) -> u64 {
        self.rpc.block_number().await.unwrap()
    }

    /// Transfer events of `token` in blocks `0..=to` on the node.
    async fn transfer_logs(&self, token: &str, to: u64) -> usize {
        let transfer = format!(
            "0x{}",
            hex::encode(Keccak256::digest(b"Transfer(address,address,uint256)"))
        );
        let logs = self
            .rpc
            .call(
                "eth_getLogs",
                json!([{"fromBlock": "0x0", "toBlock": format!("0x{to:x}"), "address": token, "topics": [transfer]}]),
            )
            .await
            .unwrap();
        logs.as_array().unwrap().len()
    }
}

fn indexer_url(db: &TestDb) -> String {
    db.options(Component::Indexer.role()).to_url()
}

fn follow_command(db: &TestDb, anvil: &Anvil, token: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(DALP);
    cmd.args([
        "index",
        "follow",
        "--rpc",
        &anvil.url(),
        "--chain-id",
        "31337",
    ])
    .args(["--contracts", token, "--finality-depth", "20"])
    .args(extra)
    // The URL carries a password: environment, not argv (visible in ps).
    .env("DALP_DATABASE_URL", indexer_url(db))
    .env_remove("DALP_DATA_DIR");
    cmd
}

fn follow_once(db: &TestDb, anvil: &Anvil, token: &str) -> Output {
    let out = follow_command(db, anvil, token, &["--once", "--batch", "7"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "follow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Indexed balances and supply equal the contract's at each of `blocks`, and the current
/// balances equal the contract's at `current` (the checkpoint).
async fn assert_index_matches(
    store: &IndexedStore,
    node: &Node,
    token: &str,
    blocks: &[u64],
    current: u64,
) {
    let t = parse_address("token", "test", token).unwrap();
    for &b in blocks {
        for i in 0..5 {
            let a = parse_address("account", "test", &node.accounts[i]).unwrap();
            assert_eq!(
                store.balance_at(CHAIN, &t, &a, b as i64).await.unwrap(),
                node.balance_of(token, i, b).await.to_string(),
                "balance of account {i} at block {b}"
            );
        }
        assert_eq!(
            store.supply_at(CHAIN, &t, b as i64).await.unwrap(),
            node.total_supply(token, b).await.to_string(),
            "supply at block {b}"
        );
    }
    for i in 0..5 {
        let a = parse_address("account", "test", &node.accounts[i]).unwrap();
        let now = store.balances_of(CHAIN, &a).await.unwrap();
        let indexed = now.first().map(|b| b.balance.clone()).unwrap_or("0".into());
        assert_eq!(
            indexed,
            node.balance_of(token, i, current).await.to_string(),
            "current balance of {i}"
        );
    }
}

fn store_for(db: &TestDb) -> IndexedStore {
    IndexedStore::new(db.pools_sized(2).get(Component::Indexer).clone())
}

#[tokio::test]
async fn follower_matches_the_contract_at_head_past_blocks_and_after_a_reorg() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let anvil = Anvil::start(CHAIN as u64);
    let node = Node::new(&anvil).await;
    let token = node.deploy().await;
    for i in 1..=3 {
        node.mint(&token, i, 1_000_000 * i as u128).await;
    }
    node.transfer(&token, 1, 2, 12_345).await;
    node.transfer(&token, 3, 4, 999).await;
    node.transfer(&token, 2, 1, 1).await;
    let burn = format!(
        "{}{}{}",
        selector("burn(address,uint256)"),
        word_addr(&node.accounts[3]),
        word_u(500)
    );
    node.send(0, Some(&token), burn).await;
    node.send(0, Some(&token), selector("pause()")).await;
    node.send(0, Some(&token), selector("unpause()")).await;
    let grant = format!(
        "{}{}{}",
        selector("grantRole(bytes32,address)"),
        hex::encode(Keccak256::digest(b"MINTER_ROLE")),
        word_addr(&node.accounts[2])
    );
    node.send(0, Some(&token), grant).await;
    // A block without our contract's logs, to check filtering.
    node.send(5, Some(&node.accounts[6].clone()), String::new())
        .await;

    follow_once(&db, &anvil, &token);
    let store = store_for(&db);
    let head = node.head().await;
    let status = store.status(CHAIN).await.unwrap();
    assert_eq!(status.checkpoint, Some(head as i64));
    assert_eq!(status.lag, Some(0));
    let every: Vec<u64> = (0..=head).collect();
    assert_index_matches(&store, &node, &token, &every, head).await;

    let su = db.superuser().await;
    let events: Vec<(String, i64)> = su
        .query(
            "SELECT event, count(*) FROM dalp_indexed.logs WHERE event IS NOT NULL GROUP BY event ORDER BY event",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let count = |e: &str| events.iter().find(|(n, _)| n == e).map(|(_, c)| *c);
    assert_eq!(count("Transfer"), Some(7), "{events:?}");
    assert_eq!(count("Paused"), Some(1));
    assert_eq!(count("Unpaused"), Some(1));
    assert_eq!(
        count("RoleGranted"),
        Some(3),
        "two in the constructor, one grant"
    );
    let role_rows: i64 = su
        .query_one("SELECT count(*) FROM dalp_indexed.role_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(role_rows, 3);
    // Only our contract's transactions are kept: the plain value transfer is not.
    let txs: i64 = su
        .query_one("SELECT count(*) FROM dalp_indexed.transactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        txs as u64,
        head - 1,
        "every block but the last carries one of our transactions"
    );

    // Reorg: 3 blocks on one branch, indexed; revert; 5 different blocks on the other.
    let snapshot = node.rpc.call("evm_snapshot", json!([])).await.unwrap();
    for _ in 0..3 {
        node.transfer(&token, 1, 3, 77).await;
    }
    follow_once(&db, &anvil, &token);
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(head as i64 + 3)
    );
    assert_eq!(
        node.rpc
            .call("evm_revert", json!([snapshot]))
            .await
            .unwrap(),
        json!(true)
    );
    assert_eq!(node.head().await, head);
    for k in 0..5 {
        node.transfer(&token, 2, 4, 1000 + k).await;
    }
    let out = follow_once(&db, &anvil, &token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reorg: rolled back 3 block(s) above block"),
        "{stderr}"
    );
    let new_head = node.head().await;
    assert_eq!(new_head, head + 5);
    let every: Vec<u64> = (0..=new_head).collect();
    assert_index_matches(&store, &node, &token, &every, new_head).await;
    let counts = store.counts(CHAIN).await.unwrap();
    assert_eq!(counts[0], ("blocks".into(), new_head as i64 + 1));
    assert_eq!(
        counts[3],
        (
            "transfers".into(),
            node.transfer_logs(&token, new_head).await as i64
        )
    );
    for n in head + 1..=new_head {
        let stored = store.block_hash(CHAIN, n as i64).await.unwrap().unwrap();
        let on_node = node.rpc.block_hash(n).await.unwrap().unwrap();
        assert_eq!(format!("0x{}", hex::encode(stored.0)), on_node, "block {n}");
    }
}

#[tokio::test]
async fn a_follower_killed_mid_stream_resumes_with_nothing_missing_or_duplicated() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let anvil = Anvil::start(CHAIN as u64);
    let node = Node::new(&anvil).await;
    let token = node.deploy().await;
    for i in 1..=4 {
        node.mint(&token, i, 10_000_000).await;
    }
    for k in 0..300u128 {
        let from = 1 + (k % 4) as usize;
        node.transfer(&token, from, 1 + ((k + 1) % 4) as usize, 1 + k)
            .await;
    }
    let head = node.head().await;

    let mut child = Reaped(
        // The fallback fetch path (full blocks and eth_getLogs) is the one killed here;
        // the other tests use block receipts.
        follow_command(
            &db,
            &anvil,
            &token,
            &["--batch", "3", "--poll-ms", "200", "--no-block-receipts"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let store = store_for(&db);
    let deadline = Instant::now() + Duration::from_secs(60);
    let killed_at = loop {
        let cp = store.status(CHAIN).await.ok().and_then(|s| s.checkpoint);
        if cp.is_some_and(|c| c >= 60) {
            child.0.kill().unwrap(); // SIGKILL
            child.0.wait().unwrap();
            break cp.unwrap();
        }
        assert!(Instant::now() < deadline, "follower made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cp = store.status(CHAIN).await.unwrap().checkpoint.unwrap();
    assert!(cp >= killed_at);
    assert!(
        (cp as u64) < head,
        "killed before catching up ({cp} of {head})"
    );
    // What is stored is exactly blocks 0..=checkpoint: no partial batch.
    let counts = store.counts(CHAIN).await.unwrap();
    assert_eq!(counts[0].1, cp + 1);
    assert_eq!(
        counts[3].1,
        node.transfer_logs(&token, cp as u64).await as i64
    );
    assert_index_matches(&store, &node, &token, &[cp as u64], cp as u64).await;

    follow_once(&db, &anvil, &token);
    let counts = store.counts(CHAIN).await.unwrap();
    assert_eq!(counts[0].1, head as i64 + 1);
    assert_eq!(counts[3].1, node.transfer_logs(&token, head).await as i64);
    assert_eq!(counts[3].1, 4 + 300);
    let samples: Vec<u64> = (0..=head).step_by(17).chain([head]).collect();
    assert_index_matches(&store, &node, &token, &samples, head).await;
}

#[tokio::test]
async fn a_dead_node_is_a_clear_error_and_a_non_zero_exit_with_nothing_stored() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(DALP)
        .args([
            "index",
            "follow",
            "--rpc",
            &format!("http://127.0.0.1:{port}"),
            "--chain-id",
            "31337",
        ])
        .args(["--once", "--give-up-after", "2"])
        .env("DALP_DATABASE_URL", indexer_url(&db))
        .env_remove("DALP_DATA_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the node"), "{stderr}");
    // The retry warnings went to a pipe: plain text, no colour codes.
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a redirected log: {stderr:?}"
    );
    let store = store_for(&db);
    assert!(store.status(CHAIN).await.unwrap().checkpoint.is_none());
    // A node on another chain is refused at once.
    let anvil = Anvil::start(5);
    let out = follow_command(
        &db,
        &anvil,
        "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the node is on chain 5, not chain 31337")
    );
}

/// Reorgs that add no block above the checkpoint — onto a shorter branch, and onto one of
/// equal length — are caught by the next poll; reads at blocks the index has not reached are
/// refused instead of answered with older state.
#[tokio::test]
async fn shorter_and_equal_length_reorgs_are_caught_and_future_reads_refused() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let anvil = Anvil::start(CHAIN as u64);
    let node = Node::new(&anvil).await;
    let token = node.deploy().await;
    node.mint(&token, 1, 1_000_000).await;
    node.mint(&token, 2, 2_000_000).await;
    follow_once(&db, &anvil, &token);
    let store = store_for(&db);
    let head = node.head().await;
    let matches_node = |n: u64| {
        let store = &store;
        let node = &node;
        async move {
            let stored = store.block_hash(CHAIN, n as i64).await.unwrap().unwrap();
            let on_node = node.rpc.block_hash(n).await.unwrap().unwrap();
            format!("0x{}", hex::encode(stored.0)) == on_node
        }
    };

    // Shorter: 3 blocks indexed, then the node goes back and has only 1 other block.
    let snapshot = node.rpc.call("evm_snapshot", json!([])).await.unwrap();
    for _ in 0..3 {
        node.transfer(&token, 1, 3, 77).await;
    }
    follow_once(&db, &anvil, &token);
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(head as i64 + 3)
    );
    node.rpc
        .call("evm_revert", json!([snapshot]))
        .await
        .unwrap();
    node.transfer(&token, 2, 4, 5).await;
    assert_eq!(node.head().await, head + 1);
    let out = follow_once(&db, &anvil, &token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reorg: rolled back"), "{stderr}");
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(head as i64 + 1)
    );
    assert!(
        matches_node(head + 1).await,
        "block {} is the node's",
        head + 1
    );
    let every: Vec<u64> = (0..=head + 1).collect();
    assert_index_matches(&store, &node, &token, &every, head + 1).await;

    // Equal length: 2 blocks indexed, replaced by 2 other blocks.
    let snapshot = node.rpc.call("evm_snapshot", json!([])).await.unwrap();
    node.transfer(&token, 1, 2, 11).await;
    node.transfer(&token, 1, 2, 12).await;
    follow_once(&db, &anvil, &token);
    node.rpc
        .call("evm_revert", json!([snapshot]))
        .await
        .unwrap();
    node.transfer(&token, 2, 1, 21).await;
    node.transfer(&token, 2, 1, 22).await;
    let h = node.head().await;
    assert_eq!(h, head + 3);
    let out = follow_once(&db, &anvil, &token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reorg: rolled back"), "{stderr}");
    for n in head + 2..=h {
        assert!(matches_node(n).await, "block {n} is the node's");
    }
    let every: Vec<u64> = (0..=h).collect();
    assert_index_matches(&store, &node, &token, &every, h).await;

    // A read at a block beyond the checkpoint is refused, naming the checkpoint.
    let t = parse_address("token", "test", &token).unwrap();
    let a = parse_address("account", "test", &node.accounts[1]).unwrap();
    let e = store
        .balance_at(CHAIN, &t, &a, h as i64 + 10)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!("indexed up to block {h}")),
        "{e}"
    );
    let e = store.supply_at(CHAIN, &t, h as i64 + 1).await.unwrap_err();
    assert!(e.to_string().contains("not indexed yet"), "{e}");
}

/// `dalp index <args>` as the indexer role.
fn dalp_index(db: &TestDb, args: &[&str]) -> Output {
    Command::new(DALP)
        .arg("index")
        .args(args)
        .env("DALP_DATABASE_URL", indexer_url(db))
        .env_remove("DALP_DATA_DIR")
        .output()
        .unwrap()
}

/// Registers the chain with `depth` before the first follow (follow only registers with
/// its own default).
async fn register(db: &TestDb, depth: i32) -> IndexedStore {
    let store = store_for(db);
    store
        .register_chain(
            &dalp_audit::RequestContext::service("test"),
            CHAIN,
            "anvil",
            depth,
        )
        .await
        .unwrap();
    store
}

/// The node changing chains under a running follower, and a node reset with its state
/// lost, are recorded divergences: the follower stops with the reason, ingest is refused,
/// status says `diverged` (exit 1) with what to do, until an operator rewinds; after
/// `rewind --to -1 --beyond-finality` the new chain is indexed from scratch and matches.
#[tokio::test]
async fn a_node_that_lost_the_chain_is_a_recorded_divergence_until_an_operator_rewinds() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let store = register(&db, 2).await;
    let anvil = Anvil::start(CHAIN as u64);
    let node = Node::new(&anvil).await;
    let token = node.deploy().await;
    for i in 1..=4 {
        node.mint(&token, i, 1000 * i as u128).await;
    }
    follow_once(&db, &anvil, &token);
    let checkpoint = node.head().await as i64;
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(checkpoint)
    );

    // 1. Another chain id behind the same URL, mid-stream.
    let mut running = Reaped(
        follow_command(&db, &anvil, &token, &["--poll-ms", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Wait until it is past its start-up chain check and polling: it indexes a new block.
    node.transfer(&token, 1, 2, 1).await;
    let checkpoint = node.head().await as i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.status(CHAIN).await.unwrap().checkpoint != Some(checkpoint) {
        assert!(
            Instant::now() < deadline,
            "the running follower never indexed block {checkpoint}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.rpc
        .call("anvil_setChainId", json!([999]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = running.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the follower kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!exit.success());
    let mut err = String::new();
    std::io::Read::read_to_string(running.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("diverged") && err.contains("chain 999"),
        "{err}"
    );
    let s = store.status(CHAIN).await.unwrap();
    assert_eq!(s.state, "diverged");
    assert!(s.diverged.as_ref().unwrap().reason.contains("chain 999"));
    let o = dalp_index(&db, &["status", "--chain-id", "31337"]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(output_text(&o).contains("DIVERGED"), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("dalp index rewind"),
        "{}",
        output_text(&o)
    );
    // The store refuses to move a diverged chain, whoever asks.
    let e = store
        .rewind(
            &dalp_audit::RequestContext::service("test"),
            CHAIN,
            checkpoint - 1,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, dalp_indexed::IndexError::Diverged { .. }),
        "{e}"
    );
    // The node goes back to the right chain; the operator keeps the index as it is.
    node.rpc
        .call("anvil_setChainId", json!([CHAIN]))
        .await
        .unwrap();
    let o = dalp_index(
        &db,
        &[
            "rewind",
            "--chain-id",
            "31337",
            "--to",
            &checkpoint.to_string(),
            "--beyond-finality",
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(store.status(CHAIN).await.unwrap().state, "following");
    node.transfer(&token, 1, 2, 5).await;
    follow_once(&db, &anvil, &token);
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(checkpoint + 1)
    );

    // 2. The node restarts with its state lost: its head is below our finality window.
    node.rpc.call("anvil_reset", json!([])).await.unwrap();
    node.rpc.call("anvil_mine", json!(["0x2"])).await.unwrap();
    let o = follow_command(&db, &anvil, &token, &["--once"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(output_text(&o).contains("diverged"), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("no common ancestor"),
        "{}",
        output_text(&o)
    );
    let s = store.status(CHAIN).await.unwrap();
    assert_eq!(s.state, "diverged");
    assert_eq!(
        s.checkpoint,
        Some(checkpoint + 1),
        "nothing was rolled back"
    );
    // A second follower does not touch it either.
    let o = follow_command(&db, &anvil, &token, &["--once"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(checkpoint + 1)
    );
    // Rewind below finality is refused without --beyond-finality.
    let o = dalp_index(&db, &["rewind", "--chain-id", "31337", "--to", "-1"]);
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("--beyond-finality"),
        "{}",
        output_text(&o)
    );
    let o = dalp_index(
        &db,
        &[
            "rewind",
            "--chain-id",
            "31337",
            "--to",
            "-1",
            "--beyond-finality",
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    let s = store.status(CHAIN).await.unwrap();
    assert_eq!((s.state, s.checkpoint), ("following", None));
    // The new chain, from scratch.
    let token = node.deploy().await;
    node.mint(&token, 3, 77).await;
    follow_once(&db, &anvil, &token);
    let h = node.head().await;
    let every: Vec<u64> = (0..=h).collect();
    assert_index_matches(&store, &node, &token, &every, h).await;
    // Both findings and both operator rewinds are on the audit record.
    assert_eq!(audit_count(&db, "indexed.chain.diverged").await, 2);
    assert_eq!(audit_count(&db, "indexed.blocks.rewind").await, 2);
}

/// Audit events with `action` in the test's database.
async fn audit_count(db: &TestDb, action: &str) -> i64 {
    db.superuser()
        .await
        .query_one(
            "SELECT count(*) FROM dalp_audit.events WHERE action = $1",
            &[&action],
        )
        .await
        .unwrap()
        .get(0)
}

/// A token whose contract disagrees with the transfers dalp indexed — its totalSupply, or
/// one holder's balance, changed without a Transfer event — is named with the block by
/// `dalp index reconcile` and `dalp index status` (exit 1), and the finding is audited.
#[tokio::test]
async fn reconciliation_names_a_token_whose_contract_disagrees() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    register(&db, 0).await;
    let anvil = Anvil::start(CHAIN as u64);
    let node = Node::new(&anvil).await;
    let token = node.deploy().await;
    node.mint(&token, 1, 1_000).await;
    node.mint(&token, 2, 2_000).await;
    node.transfer(&token, 1, 3, 300).await;
    follow_once(&db, &anvil, &token);
    let reconcile = |db: &TestDb, anvil: &Anvil| {
        dalp_index(
            db,
            &[
                "reconcile",
                "--rpc",
                &anvil.url(),
                "--chain-id",
                "31337",
                "--json",
            ],
        )
    };
    let o = reconcile(&db, &anvil);
    assert!(o.status.success(), "{}", output_text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["reconciliations"][0];
    assert_eq!(r["in_agreement"], true, "{v}");
    assert_eq!(r["node_supply"], "3000", "{v}");
    assert_eq!(r["balances_checked"], 3, "{v}");

    // totalSupply is ERC-20 storage slot 2 (checked before it is changed).
    let slot = |n: u64| format!("0x{n:064x}");
    let at = node
        .rpc
        .call("eth_getStorageAt", json!([token, slot(2), "latest"]))
        .await
        .unwrap();
    assert_eq!(at, json!(format!("0x{:064x}", 3000)));
    node.rpc
        .call(
            "anvil_setStorageAt",
            json!([token, slot(2), format!("0x{:064x}", 3500)]),
        )
        .await
        .unwrap();
    node.rpc.call("evm_mine", json!([])).await.unwrap();
    follow_once(&db, &anvil, &token);
    let block = node.head().await;
    let o = reconcile(&db, &anvil);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["reconciliations"][0];
    assert_eq!(r["token"], json!(token), "{v}");
    assert_eq!(r["block"], json!(block), "{v}");
    assert_eq!(
        (r["indexed_supply"].as_str(), r["node_supply"].as_str()),
        (Some("3000"), Some("3500")),
        "{v}"
    );
    assert_eq!(r["in_agreement"], false);
    let o = dalp_index(&db, &["status", "--chain-id", "31337"]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        output_text(&o).contains(&format!("{token} at block {block}: DISAGREES")),
        "{}",
        output_text(&o)
    );

    // Supply put right, one holder's balance changed instead (mapping at slot 0).
    node.rpc
        .call(
            "anvil_setStorageAt",
            json!([token, slot(2), format!("0x{:064x}", 3000)]),
        )
        .await
        .unwrap();
    let holder = &node.accounts[2];
    let key = format!(
        "0x{}",
        hex::encode(Keccak256::digest(
            hex::decode(format!(
                "{}{}",
                word_addr(holder),
                slot(0).trim_start_matches("0x")
            ))
            .unwrap(),
        ))
    );
    node.rpc
        .call(
            "anvil_setStorageAt",
            json!([token, key, format!("0x{:064x}", 1)]),
        )
        .await
        .unwrap();
    node.rpc.call("evm_mine", json!([])).await.unwrap();
    follow_once(&db, &anvil, &token);
    assert_eq!(
        node.balance_of(&token, 2, node.head().await)
            .await
            .to_string(),
        "1"
    );
    let o = reconcile(&db, &anvil);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["reconciliations"][0];
    assert_eq!(r["node_supply"], "3000", "{v}");
    assert_eq!(r["drifted_accounts"], json!([holder]), "{v}");
    // One audit event per finding that started a disagreement (the second round found the
    // token still disagreeing).
    assert_eq!(audit_count(&db, "indexed.reconcile.drift").await, 1);
}

/// A JSON-RPC proxy in front of the node that, for its first `lies` answers to
/// `eth_blockNumber`, announces a head 2 blocks above what the node serves — as a load
/// balancer does when one backend is ahead of another. Returns its URL; it runs until the
/// test ends.
async fn lagging_head_proxy(node_url: String, lies: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let told = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (http, node_url, told) = (http.clone(), node_url.clone(), told.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let body = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break buf[end + 4..end + 4 + len].to_vec();
                    }
                };
                let request: Value = serde_json::from_slice(&body).unwrap();
                let mut answer: Value = http
                    .post(&node_url)
                    .json(&request)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let calls: Vec<&Value> = match &request {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                for call in calls {
                    if call["method"] != "eth_blockNumber"
                        || told.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= lies
                    {
                        continue;
                    }
                    let slot = match &mut answer {
                        Value::Array(items) => items.iter_mut().find(|i| i["id"] == call["id"]),
                        one => Some(one),
                    };
                    if let Some(slot) = slot {
                        let h = u64::from_str_radix(
                            slot["result"].as_str().unwrap().trim_start_matches("0x"),
                            16,
                        )
                        .unwrap();
                        slot["result"] = json!(format!("0x{:x}", h + 2));
                    }
                }
                let out = answer.to_string();
                let _ = sock
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                            out.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    url
}

/// A head announced before its block is served (the node answers null for the newest
/// blocks of a batch) is retried, not fatal, and the index ends equal to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_announced_before_its_block_is_served_is_retried() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let anvil = Anvil::start(CHAIN as u64);
    let node = Node::new(&anvil).await;
    let token = node.deploy().await;
    node.mint(&token, 1, 500).await;
    node.transfer(&token, 1, 2, 200).await;
    let proxy = lagging_head_proxy(anvil.url(), 3).await;
    let out = Command::new(DALP)
        .args(["index", "follow", "--rpc", &proxy, "--chain-id", "31337"])
        .args(["--contracts", &token, "--once", "--give-up-after", "8"])
        .env("DALP_DATABASE_URL", indexer_url(&db))
        .env_remove("DALP_DATA_DIR")
        .output()
        .unwrap();
    let err = output_text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("has no block") && err.contains("retrying"),
        "{err}"
    );
    let store = store_for(&db);
    let h = node.head().await;
    assert_eq!(
        store.status(CHAIN).await.unwrap().checkpoint,
        Some(h as i64)
    );
    let every: Vec<u64> = (0..=h).collect();
    assert_index_matches(&store, &node, &token, &every, h).await;
}

/// A dev chain whose genesis is at time 0 (anvil --timestamp 0) is indexed from block 0,
/// with one partition for January 1970 rather than one per month since.
#[tokio::test]
async fn a_chain_with_its_genesis_at_time_zero_is_indexed_from_block_zero() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let anvil = Anvil::start_with(CHAIN as u64, &["--timestamp", "0"]);
    let node = Node::new(&anvil).await;
    let genesis = node
        .rpc
        .call("eth_getBlockByNumber", json!(["0x0", false]))
        .await
        .unwrap();
    assert_eq!(genesis["timestamp"], "0x0", "{genesis}");
    let token = node.deploy().await;
    node.mint(&token, 1, 42).await;
    follow_once(&db, &anvil, &token);
    let store = store_for(&db);
    assert!(
        store.block_hash(CHAIN, 0).await.unwrap().is_some(),
        "block 0 indexed"
    );
    let h = node.head().await;
    let every: Vec<u64> = (0..=h).collect();
    assert_index_matches(&store, &node, &token, &every, h).await;
    let su = db.superuser().await;
    let parts: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'dalp_indexed.transfers'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        parts <= 8,
        "{parts} transfer partitions for a two-month chain"
    );
}
