//! The ingest path against a real PostgreSQL: idempotence, gaps, reorgs within and beyond the
//! finality depth, malformed input, balances and supply at past blocks, partitions.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_indexed::decode::{decode, Decoded};
use dalp_indexed::store::{TransferFilter, TransferQuery};
use dalp_indexed::synth::Synth;
use dalp_indexed::types::{parse_batch, Address, Block, BlockInput, LogInput};
use dalp_indexed::{IndexError, IndexedStore};
use dalp_testkit::{migrated_database, TestDb};
use num_bigint::BigInt;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_indexed::MIGRATIONS, dalp_audit::MIGRATIONS];

const CHAIN: i64 = 31337;

async fn store(db: &TestDb, finality_depth: i32) -> IndexedStore {
    let pools = db.pools_sized(2);
    let store = IndexedStore::new(pools.get(Component::Indexer).clone());
    store
        .register_chain(&ctx(), CHAIN, "test", finality_depth)
        .await
        .unwrap();
    store
}

fn ctx() -> RequestContext {
    RequestContext::service("indexer-test")
}

/// Balances and supply by replaying the transfers of `chain` (the canonical branch).
fn replay(chain: &[&Block]) -> (HashMap<Address, BigInt>, BigInt) {
    let mut balances: HashMap<Address, BigInt> = HashMap::new();
    let mut supply = BigInt::default();
    for b in chain {
        for l in &b.logs {
            if let Some(Decoded::Transfer(t)) = decode(l, "x").unwrap() {
                let v = BigInt::from(t.value.clone());
                if t.from == Address::default() {
                    supply += &v;
                } else {
                    *balances.entry(t.from).or_default() -= &v;
                }
                if t.to == Address::default() {
                    supply -= &v;
                } else {
                    *balances.entry(t.to).or_default() += &v;
                }
            }
        }
    }
    (balances, supply)
}

async fn assert_matches(store: &IndexedStore, synth: &Synth, chain: &[&Block]) {
    let (expected, supply) = replay(chain);
    for a in &synth.accounts {
        let got = store.balances_of(CHAIN, a).await.unwrap();
        let want = expected.get(a).cloned().unwrap_or_default();
        let got_v = got.first().map(|b| b.balance.clone()).unwrap_or("0".into());
        assert_eq!(got_v, want.to_string(), "balance of {a:?}");
    }
    let tip = chain.last().unwrap().number;
    assert_eq!(
        store.supply_at(CHAIN, &synth.token, tip).await.unwrap(),
        supply.to_string()
    );
    // Balance at every past block equals the replay up to that block.
    for n in [0, tip / 2, tip] {
        let upto: Vec<&Block> = chain.iter().copied().filter(|b| b.number <= n).collect();
        let (at, _) = replay(&upto);
        for a in synth.accounts.iter().take(5) {
            assert_eq!(
                store.balance_at(CHAIN, &synth.token, a, n).await.unwrap(),
                at.get(a).cloned().unwrap_or_default().to_string(),
                "balance at block {n}"
            );
        }
    }
}

fn synth() -> Synth {
    Synth::new(20, 6, Utc::now() - chrono::Duration::hours(2))
}

async fn counts(store: &IndexedStore) -> Vec<(String, i64)> {
    store.counts(CHAIN).await.unwrap()
}

#[tokio::test]
async fn ingest_is_idempotent_and_balances_hold_at_every_block() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 64).await;
    let s = synth();
    let blocks = s.blocks(0, 30, 0);
    for chunk in blocks.chunks(7) {
        let out = store.ingest(&ctx(), CHAIN, chunk, Some(40)).await.unwrap();
        assert_eq!(out.applied, chunk.len());
    }
    let all: Vec<&Block> = blocks.iter().collect();
    assert_matches(&store, &s, &all).await;
    let before = counts(&store).await;
    assert_eq!(before[0], ("blocks".into(), 31));
    assert_eq!(before[3], ("transfers".into(), 20 + 30 * 6));

    // Re-sending blocks already stored changes nothing.
    let out = store
        .ingest(&ctx(), CHAIN, &blocks[10..=20], None)
        .await
        .unwrap();
    assert_eq!((out.applied, out.skipped, out.reorg), (0, 11, None));
    assert_eq!(counts(&store).await, before);
    // A batch overlapping the tip writes only what is new.
    let more = s.blocks(28, 33, 0);
    let out = store.ingest(&ctx(), CHAIN, &more, None).await.unwrap();
    assert_eq!((out.applied, out.skipped, out.checkpoint), (3, 3, 33));

    let st = store.status(CHAIN).await.unwrap();
    assert_eq!(st.checkpoint, Some(33));
    assert_eq!(st.head, Some(40));
    assert_eq!(st.lag, Some(7));
    assert_eq!(st.finalized, Some(0));

    // Paged holders and transfers.
    let page1 = store.holders(CHAIN, &s.token, 5, None).await.unwrap();
    assert_eq!(page1.len(), 5);
    let last = page1.last().unwrap();
    let acct = dalp_indexed::types::parse_address("a", "x", &last.account).unwrap();
    let page2 = store
        .holders(CHAIN, &s.token, 50, Some((&last.balance, &acct)))
        .await
        .unwrap();
    assert_eq!(page1.len() + page2.len(), 20, "{page1:#?} {page2:#?}");
    let all_balances: Vec<BigInt> = page1
        .iter()
        .chain(&page2)
        .map(|h| h.balance.parse().unwrap())
        .collect();
    assert!(
        all_balances.windows(2).all(|w| w[0] >= w[1]),
        "largest first"
    );
    assert!(page2
        .iter()
        .all(|h| page1.iter().all(|p| p.account != h.account)));
    let q = TransferQuery {
        limit: 10,
        ..Default::default()
    };
    let t1 = store
        .transfers(CHAIN, TransferFilter::Token(&s.token), &q)
        .await
        .unwrap();
    assert_eq!(t1.len(), 10);
    assert_eq!(t1[0].block_number, 33);
    let q2 = TransferQuery {
        before: Some((t1[9].block_number, t1[9].log_index)),
        limit: 1000,
        ..Default::default()
    };
    let t2 = store
        .transfers(CHAIN, TransferFilter::Token(&s.token), &q2)
        .await
        .unwrap();
    assert_eq!(t1.len() + t2.len(), 20 + 33 * 6);
}

#[tokio::test]
async fn gaps_and_foreign_parents_are_refused_without_change() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 64).await;
    let s = synth();
    store
        .ingest(&ctx(), CHAIN, &s.blocks(0, 10, 0), None)
        .await
        .unwrap();
    let before = counts(&store).await;

    let e = store
        .ingest(&ctx(), CHAIN, &s.blocks(13, 15, 0), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            IndexError::Gap {
                indexed: 10,
                got: 13,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("send blocks 11 to 12 first"), "{e}");

    // Block 11 whose parent is not our block 10: a reorg below the batch.
    let other = s.clone().on_branch(9);
    let e = store
        .ingest(&ctx(), CHAIN, &other.blocks(11, 12, 9), None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, IndexError::ParentMismatch { number: 11 }),
        "{e}"
    );
    assert_eq!(counts(&store).await, before);

    // A batch that is not consecutive inside itself.
    let mut broken = s.blocks(11, 13, 0);
    broken.remove(1);
    let e = store
        .ingest(&ctx(), CHAIN, &broken, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("consecutive"), "{e}");
    assert_eq!(counts(&store).await, before);
}

#[tokio::test]
async fn a_reorg_within_the_finality_depth_rolls_back_and_applies_the_new_branch() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 10).await;
    let s = synth();
    let main = s.blocks(0, 25, 0);
    store.ingest(&ctx(), CHAIN, &main, None).await.unwrap();
    // Branch 1 forks after block 19: blocks 20..=27 differ.
    let b1 = s.clone().on_branch(1);
    let fork_blocks = b1.blocks(20, 27, 0);
    let mut batch = main[18..20].to_vec(); // 18, 19 (shared) then the new branch
    batch.extend(fork_blocks.iter().cloned());
    let out = store.ingest(&ctx(), CHAIN, &batch, None).await.unwrap();
    assert_eq!(out.reorg.as_ref().map(|r| (r.fork, r.depth)), Some((19, 6)));
    assert_eq!((out.applied, out.skipped, out.checkpoint), (8, 2, 27));
    let canonical: Vec<&Block> = main[..20].iter().chain(fork_blocks.iter()).collect();
    assert_matches(&store, &s, &canonical).await;
    assert_eq!(
        store.block_hash(CHAIN, 22).await.unwrap(),
        Some(dalp_indexed::synth::block_hash(22, 1))
    );
    let c = counts(&store).await;
    assert_eq!(c[0].1, 28);
    assert_eq!(c[3].1, 20 + 27 * 6);

    // Deeper than the finality depth (10): refused, nothing changes.
    let b2 = s.clone().on_branch(2);
    let mut deep = main[10..12].to_vec(); // 10, 11 shared
    deep.extend(b2.blocks(12, 30, 0));
    let e = store.ingest(&ctx(), CHAIN, &deep, None).await.unwrap_err();
    assert!(
        matches!(
            e,
            IndexError::DeepReorg {
                fork: 11,
                depth: 16,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("nothing was changed"));
    assert_eq!(counts(&store).await, c);
    assert_matches(&store, &s, &canonical).await;
}

fn log_input(data: &str, address: &str) -> LogInput {
    let word = |b: u8| format!("0x{}{:02x}", "00".repeat(31), b);
    LogInput {
        tx_hash: format!("0x{}", "11".repeat(32)),
        tx_index: 0,
        log_index: 0,
        address: address.into(),
        topics: vec![
            format!("0x{}", hex::encode(dalp_indexed::decode::TRANSFER.0)),
            word(1),
            word(2),
        ],
        data: data.into(),
    }
}

fn block_input(logs: Vec<LogInput>) -> BlockInput {
    BlockInput {
        number: 0,
        hash: format!("0x{}", "aa".repeat(32)),
        parent_hash: format!("0x{}", "00".repeat(32)),
        timestamp: Utc::now().timestamp(),
        transactions: vec![],
        logs,
    }
}

#[tokio::test]
async fn malformed_input_is_refused_with_the_field_named_and_nothing_stored() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 64).await;
    let token = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
    let one = format!("0x{}01", "00".repeat(31));
    // Bad hex, short hash, bad EIP-55 checksum, a 5th topic.
    let mut bad_hex = block_input(vec![log_input("0xzz", token)]);
    let e = parse_batch(std::slice::from_ref(&bad_hex)).unwrap_err();
    assert_eq!(e.field, "data");
    bad_hex.logs[0].data = one.clone();
    bad_hex.hash = "0x1234".into();
    let e = parse_batch(&[bad_hex]).unwrap_err();
    assert_eq!(e.field, "hash");
    assert!(e.message.contains("32 bytes"), "{e}");
    let e = parse_batch(&[block_input(vec![log_input(
        &one,
        "0x5FBDB2315678afecb367f032d93f642f64180aA3",
    )])])
    .unwrap_err();
    assert!(e.message.contains("checksum"), "{e}");

    // A Transfer value above 2^256-1 (33 bytes): parsed, but refused when decoded.
    let big = format!("0x01{}", "00".repeat(32));
    let blocks = parse_batch(&[block_input(vec![log_input(&big, token)])]).unwrap();
    let e = store
        .ingest(&ctx(), CHAIN, &blocks, None)
        .await
        .unwrap_err();
    match &e {
        IndexError::Invalid(i) => {
            assert_eq!(i.field, "data");
            assert!(i.message.contains("2^256-1"), "{e}");
        }
        other => panic!("expected invalid, got {other}"),
    }
    assert!(counts(&store).await.iter().all(|(_, n)| *n == 0));
    assert!(store.status(CHAIN).await.unwrap().checkpoint.is_none());

    // And the table itself refuses such a value, whoever writes it.
    let client = db.connect_as(Component::Indexer).await;
    let e = client
        .execute(
            "INSERT INTO dalp_indexed.transfers (chain_id, block_number, block_time, log_index, tx_hash, token, from_address, to_address, value)
             VALUES (1, 1, now(), 0, decode(repeat('11', 32), 'hex'), decode(repeat('22', 20), 'hex'),
                     decode(repeat('33', 20), 'hex'), decode(repeat('44', 20), 'hex'), 2::numeric ^ 256)",
            &[],
        )
        .await
        .unwrap_err();
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("check constraint"), "{e:?}");

    // Unknown chain.
    let e = store
        .ingest(
            &ctx(),
            999,
            &parse_batch(&[block_input(vec![])]).unwrap(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, IndexError::UnknownChain(999)), "{e}");
}

#[tokio::test]
async fn old_blocks_get_partitions_time_bounded_queries_prune_and_retention_drops() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 64).await;
    // Genesis in January 2020: 12 s blocks, so 300 blocks stay in that month.
    let mut s = Synth::new(10, 3, Utc.with_ymd_and_hms(2020, 1, 31, 23, 0, 0).unwrap());
    s.transfers_per_block = 3;
    store
        .ingest(&ctx(), CHAIN, &s.blocks(0, 600, 0), None)
        .await
        .unwrap();
    let su = db.superuser().await;
    let parts: Vec<String> = su
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'dalp_indexed.transfers'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        parts.contains(&"transfers_p202001".to_string()),
        "{parts:?}"
    );
    assert!(
        parts.contains(&"transfers_p202002".to_string()),
        "{parts:?}"
    );

    // A time-bounded query touches only the matching partition.
    let (sql, _) = dalp_indexed::store::transfers_sql(TransferFilter::Token(&s.token));
    let plan: Vec<String> = su
        .query(
            &format!(
                "EXPLAIN {}",
                sql.replace("$1", "31337")
                    .replace("$2", &format!("'\\x{}'::bytea", hex::encode(s.token.0)))
                    .replace("$3::timestamptz", "'2020-02-01T00:00:00Z'::timestamptz")
                    .replace("$3", "'2020-02-01T00:00:00Z'::timestamptz")
                    .replace("$4::timestamptz", "'2020-02-02T00:00:00Z'::timestamptz")
                    .replace("$4", "'2020-02-02T00:00:00Z'::timestamptz")
                    .replace("$5::int8", "NULL::int8")
                    .replace("$5", "NULL::int8")
                    .replace("$6::int4", "NULL::int4")
                    .replace("$7", "10")
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("transfers_p202002"), "{plan}");
    assert!(!plan.contains("transfers_p202001"), "{plan}");
    assert!(
        !plan.contains(&format!("transfers_p{}", Utc::now().format("%Y%m"))),
        "{plan}"
    );
    let q = TransferQuery {
        since: Some(Utc.with_ymd_and_hms(2020, 2, 1, 0, 0, 0).unwrap()),
        until: Some(Utc.with_ymd_and_hms(2020, 2, 2, 0, 0, 0).unwrap()),
        limit: 10_000,
        ..Default::default()
    };
    let feb = store
        .transfers(CHAIN, TransferFilter::Token(&s.token), &q)
        .await
        .unwrap();
    assert!(!feb.is_empty());
    assert!(feb.iter().all(|t| t.block_time >= q.since.unwrap()));

    // Retention of 12 months drops both 2020 partitions (and reports the rows).
    let mut policy = dalp_indexed::PARTITIONS[2];
    policy.retention_months = Some(12);
    let mut owner = db.connect(dalp_db::MIGRATOR_ROLE).await;
    let report = dalp_db::partitions::maintain(&mut owner, &policy, Utc::now())
        .await
        .unwrap();
    let dropped: Vec<&str> = report.dropped.iter().map(|(n, _)| n.as_str()).collect();
    assert!(dropped.contains(&"transfers_p202001"), "{dropped:?}");
    assert!(report.dropped.iter().all(|(_, rows)| *rows > 0));
    let left: i64 = su
        .query_one(
            "SELECT count(*) FROM dalp_indexed.transfers WHERE block_time < '2021-01-01'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert!(report.horizon.unwrap() > Utc::now() + chrono::Duration::days(60));
}

/// A dev chain's genesis at time 0, then blocks of today: one partition for January 1970
/// and today's month, not one per month in between (and no "bad range" error).
#[tokio::test]
async fn a_genesis_at_time_zero_gets_one_partition_not_fifty_years_of_them() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 64).await;
    let s = Synth::new(4, 1, Utc::now());
    let mut blocks = s.blocks(0, 3, 0);
    blocks[0].time = Utc.timestamp_opt(0, 0).unwrap();
    let su = db.superuser().await;
    let count = |c: tokio_postgres::Client| async move {
        c.query_one(
            "SELECT count(*) FROM pg_inherits i WHERE i.inhparent = 'dalp_indexed.transfers'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let before = count(db.superuser().await).await;
    store.ingest(&ctx(), CHAIN, &blocks, None).await.unwrap();
    let after = count(db.superuser().await).await;
    assert_eq!(after - before, 1, "only January 1970 is new");
    let has_1970: bool = su
        .query_one(
            "SELECT to_regclass('dalp_indexed.transfers_p197001') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(has_1970);
    assert_eq!(store.status(CHAIN).await.unwrap().checkpoint, Some(3));
}
