//! Transaction requests: the legal lifecycle, refused transitions that change nothing,
//! deduplication within 24 hours, gap-free nonces under concurrency and after failures.

use std::collections::BTreeSet;
use std::time::Duration;

use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_testkit::{migrated_database, TestDb};
use dalp_workflows::{NewTxRequest, TransitionInput, TxStatus, WorkflowError, WorkflowStore};
use uuid::Uuid;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_workflows::MIGRATIONS, dalp_audit::MIGRATIONS];

fn ctx() -> RequestContext {
    RequestContext::service("workflows-test")
}

fn store(db: &TestDb, size: usize) -> WorkflowStore {
    WorkflowStore::new(db.pools_sized(size).get(Component::Workflows).clone())
}

const SIGNER: &str = "0x5fbdb2315678afecb367f032d93f642f64180aa3";

fn request(key: &str) -> NewTxRequest {
    NewTxRequest {
        organisation_id: Uuid::nil(),
        chain_id: 31337,
        sender: SIGNER.into(),
        to: Some("0x70997970c51812dc3a010c7d01b50e0d17dc79c8".into()),
        value: Some("1000000000000000000".into()),
        data: Some("0xa9059cbb".into()),
        idempotency_key: key.into(),
    }
}

async fn transitions(db: &TestDb) -> i64 {
    db.superuser()
        .await
        .query_one("SELECT count(*) FROM dalp_workflows.tx_transitions", &[])
        .await
        .unwrap()
        .get(0)
}

fn none() -> TransitionInput {
    TransitionInput::default()
}

#[tokio::test]
async fn a_request_walks_the_lifecycle_and_illegal_moves_change_nothing() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 4);
    let (req, created) = store
        .create_tx_request(&ctx(), &request("pay-1"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(req.status, TxStatus::Received);
    let (dup, created) = store
        .create_tx_request(&ctx(), &request("pay-1"))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(dup.id, req.id);

    // Illegal: RECEIVED -> SIGNING; COMPLETED from QUEUED.
    let before = transitions(&db).await;
    let e = store
        .transition(&ctx(), req.id, TxStatus::Signing, &none())
        .await
        .unwrap_err();
    assert!(matches!(e, WorkflowError::IllegalTransition { .. }), "{e}");
    assert!(e.to_string().contains("RECEIVED -> SIGNING"), "{e}");
    assert_eq!(transitions(&db).await, before);
    assert_eq!(
        store.tx_request(req.id).await.unwrap().status,
        TxStatus::Received
    );

    let id = req.id;
    store
        .transition(&ctx(), id, TxStatus::Queued, &none())
        .await
        .unwrap();
    let p = store
        .transition(
            &ctx(),
            id,
            TxStatus::Preparing,
            &TransitionInput {
                gas_limit: Some(21000),
                ..none()
            },
        )
        .await
        .unwrap();
    assert_eq!((p.nonce, p.gas_limit), (Some(0), Some(21000)));
    store
        .transition(&ctx(), id, TxStatus::PendingApproval, &none())
        .await
        .unwrap();
    store
        .transition(&ctx(), id, TxStatus::Signing, &none())
        .await
        .unwrap();
    store
        .transition(&ctx(), id, TxStatus::Broadcasting, &none())
        .await
        .unwrap();
    let e = store
        .transition(&ctx(), id, TxStatus::Confirming, &none())
        .await
        .unwrap_err();
    assert!(
        matches!(e, WorkflowError::Invalid(ref i) if i.field == "tx_hash"),
        "{e}"
    );
    let hash = format!("0x{}", "ab".repeat(32));
    store
        .transition(
            &ctx(),
            id,
            TxStatus::Confirming,
            &TransitionInput {
                tx_hash: Some(hash.clone()),
                ..none()
            },
        )
        .await
        .unwrap();
    // A confirmation timeout is a state to re-check, not a failure.
    let c = store
        .confirmation_timed_out(&ctx(), id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(c.status, TxStatus::Confirming);
    assert!(c.recheck_at.is_some());
    let done = store
        .transition(&ctx(), id, TxStatus::Completed, &none())
        .await
        .unwrap();
    assert_eq!(done.tx_hash.as_deref(), Some(hash.as_str()));
    let e = store
        .transition(&ctx(), id, TxStatus::Cancelled, &none())
        .await
        .unwrap_err();
    assert!(
        matches!(e, WorkflowError::IllegalTransition { .. }),
        "terminal: {e}"
    );
    let e = store
        .confirmation_timed_out(&ctx(), id, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, WorkflowError::IllegalTransition { .. }), "{e}");

    let path: Vec<String> = store
        .tx_transitions(id)
        .await
        .unwrap()
        .iter()
        .map(|t| t.to.clone())
        .collect();
    assert_eq!(
        path,
        [
            "RECEIVED",
            "QUEUED",
            "PREPARING",
            "PENDING_APPROVAL",
            "SIGNING",
            "BROADCASTING",
            "CONFIRMING",
            "CONFIRMING",
            "COMPLETED"
        ]
    );
    let audited: i64 = db
        .superuser()
        .await
        .query_one(
            "SELECT count(*) FROM dalp_audit.events WHERE action = 'workflows.tx_request.transition' AND resource_id = $1",
            &[&id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 9);

    // Bad input never reaches the table.
    for (field, mut bad) in [
        ("sender", request("x")),
        ("value", request("y")),
        ("data", request("z")),
    ] {
        match field {
            "sender" => bad.sender = "0x1234".into(),
            "value" => bad.value = Some(format!("1{}", "0".repeat(78))),
            _ => bad.data = Some("0xzz".into()),
        }
        let e = store.create_tx_request(&ctx(), &bad).await.unwrap_err();
        assert!(
            matches!(e, WorkflowError::Invalid(ref i) if i.field == field),
            "{field}: {e}"
        );
    }
}

#[tokio::test]
async fn sixteen_concurrent_allocations_get_distinct_gap_free_nonces_and_released_ones_return() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 16);
    let mut ids = Vec::new();
    for i in 0..16 {
        let (r, _) = store
            .create_tx_request(&ctx(), &request(&format!("n-{i}")))
            .await
            .unwrap();
        store
            .transition(&ctx(), r.id, TxStatus::Queued, &none())
            .await
            .unwrap();
        ids.push(r.id);
    }
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .transition(&ctx(), id, TxStatus::Preparing, &none())
                .await
                .unwrap()
                .nonce
                .unwrap()
        }));
    }
    let mut nonces = BTreeSet::new();
    for t in tasks {
        assert!(nonces.insert(t.await.unwrap()), "duplicate nonce");
    }
    assert_eq!(nonces, (0..16).collect::<BTreeSet<i64>>(), "no gaps");

    // A request that ends before broadcast gives its nonce back; the next one gets it.
    let given_back = store.tx_request(ids[3]).await.unwrap().nonce;
    store
        .transition(&ctx(), ids[3], TxStatus::Cancelled, &none())
        .await
        .unwrap();
    assert_eq!(store.tx_request(ids[3]).await.unwrap().nonce, None);
    let (r, _) = store
        .create_tx_request(&ctx(), &request("n-next"))
        .await
        .unwrap();
    store
        .transition(&ctx(), r.id, TxStatus::Queued, &none())
        .await
        .unwrap();
    let p = store
        .transition(&ctx(), r.id, TxStatus::Preparing, &none())
        .await
        .unwrap();
    assert_eq!(p.nonce, given_back);
    let (r2, _) = store
        .create_tx_request(&ctx(), &request("n-after"))
        .await
        .unwrap();
    store
        .transition(&ctx(), r2.id, TxStatus::Queued, &none())
        .await
        .unwrap();
    let p2 = store
        .transition(&ctx(), r2.id, TxStatus::Preparing, &none())
        .await
        .unwrap();
    assert_eq!(p2.nonce, Some(16));

    // A dead-lettered request can be queued again by an operator and gets a nonce again.
    let dead = store.tx_request(ids[5]).await.unwrap().nonce;
    store
        .transition(&ctx(), ids[5], TxStatus::DeadLetter, &none())
        .await
        .unwrap();
    store
        .transition(&ctx(), ids[5], TxStatus::Queued, &none())
        .await
        .unwrap();
    let again = store
        .transition(&ctx(), ids[5], TxStatus::Preparing, &none())
        .await
        .unwrap();
    assert_eq!(again.nonce, dead);
}

fn hash(n: u64) -> String {
    format!("0x{n:064x}")
}

/// Drives `id` to `to`, with the hash CONFIRMING needs.
async fn step(
    store: &WorkflowStore,
    id: Uuid,
    to: TxStatus,
    seq: u64,
) -> dalp_workflows::TxRequest {
    let input = TransitionInput {
        tx_hash: (to == TxStatus::Confirming).then(|| hash(seq)),
        ..Default::default()
    };
    store.transition(&ctx(), id, to, &input).await.unwrap()
}

#[tokio::test]
async fn a_broadcast_nonce_is_never_handed_out_again_and_a_stranded_one_is_replaced() {
    use TxStatus::*;
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db, 4);
    let (a, _) = store
        .create_tx_request(&ctx(), &request("strand-a"))
        .await
        .unwrap();
    for (i, s) in [
        Queued,
        Preparing,
        PendingApproval,
        Signing,
        Broadcasting,
        DeadLetter,
        Queued,
        Preparing,
    ]
    .into_iter()
    .enumerate()
    {
        step(&store, a.id, s, i as u64).await;
    }
    let n = store
        .tx_request(a.id)
        .await
        .unwrap()
        .nonce
        .expect("re-queued keeps its nonce");
    // The path that handed broadcast nonces out again: cancelled before its re-broadcast.
    let ended = step(&store, a.id, Cancelled, 99).await;
    assert_eq!(
        ended.nonce,
        Some(n),
        "the broadcast nonce stays bound to its request"
    );
    let released: i64 = db
        .superuser()
        .await
        .query_one("SELECT count(*) FROM dalp_workflows.released_nonces", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(released, 0, "a broadcast nonce was released");
    // The next request gets a fresh nonce.
    let (b, _) = store
        .create_tx_request(&ctx(), &request("strand-b"))
        .await
        .unwrap();
    step(&store, b.id, Queued, 0).await;
    let b = step(&store, b.id, Preparing, 0).await;
    assert_eq!(b.nonce, Some(n + 1));
    // The stranded nonce is filled by a queued no-op self-transfer with the same nonce.
    let stranded = store.stranded_nonces().await.unwrap();
    assert_eq!(stranded.len(), 1, "{stranded:?}");
    assert_eq!((stranded[0].nonce, stranded[0].replaces), (n, a.id));
    let r = store.tx_request(stranded[0].replacement).await.unwrap();
    assert_eq!(r.status, Queued);
    assert_eq!(
        (r.nonce, r.replaces, r.to.as_deref()),
        (Some(n), Some(a.id), Some(SIGNER))
    );
    assert_eq!(r.value, "0");
    let history = store.tx_transitions(a.id).await.unwrap();
    assert_eq!(
        history.last().unwrap().detail["replacement"],
        serde_json::json!(r.id)
    );
    // The replacement broadcasts the nonce and is mined; nothing is stranded any more.
    for (i, s) in [
        Preparing,
        PendingApproval,
        Signing,
        Broadcasting,
        Confirming,
        Completed,
    ]
    .into_iter()
    .enumerate()
    {
        step(&store, r.id, s, 1000 + i as u64).await;
    }
    assert!(store.stranded_nonces().await.unwrap().is_empty());

    // The database holds the line on its own, for the service role itself.
    let svc = db.connect_as(Component::Workflows).await;
    let e = svc
        .execute(
            "INSERT INTO dalp_workflows.released_nonces (chain_id, signer, nonce) VALUES (31337, decode(substr($1, 3), 'hex'), $2)",
            &[&SIGNER, &n],
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("can never be released")
            || format!("{e:?}").contains("can never be released"),
        "{e:?}"
    );
    let e = svc
        .execute("DELETE FROM dalp_workflows.broadcast_nonces", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );
    let e = svc
        .execute(
            "UPDATE dalp_workflows.tx_requests SET nonce = NULL WHERE id = $1",
            &[&a.id],
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("stays bound"), "{e:?}");
    let (c, _) = store
        .create_tx_request(&ctx(), &request("strand-c"))
        .await
        .unwrap();
    let e = svc
        .execute(
            "INSERT INTO dalp_workflows.broadcast_nonces (chain_id, signer, nonce, request_id) VALUES (31337, decode(substr($1, 3), 'hex'), $2, $3)",
            &[&SIGNER, &n, &c.id],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{e:?}").contains("broadcast by another request"),
        "{e:?}"
    );
}

/// Random legal walks from many clients over two signers; afterwards the history and the
/// tables must show: no nonce broadcast by two requests (other than a replacement after its
/// original ended), and every nonce below `next_nonce` held by a live or mined request, or
/// released and never broadcast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_concurrent_lifecycles_never_share_or_strand_a_nonce() {
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 64;
    const SIGNERS: [&str; 2] = [SIGNER, "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"];
    let db = migrated_database(&SCHEMAS).await;
    let store = std::sync::Arc::new(store(&db, CLIENTS));
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // A random walk of legal transitions from the current status; at most `max` steps.
    async fn walk(
        store: &WorkflowStore,
        id: Uuid,
        seq: &std::sync::atomic::AtomicU64,
        max: usize,
    ) -> TxStatus {
        let mut status = store.tx_request(id).await.unwrap().status;
        for _ in 0..max {
            let next = status.next();
            if next.is_empty() {
                break;
            }
            // Forward (the first legal state) two times in three, else any other: walks
            // reach the chain often enough and still end, dead-letter and re-queue there.
            let to = if rand::random_range(0..3) < 2 {
                next[0]
            } else {
                next[rand::random_range(0..next.len())]
            };
            let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            status = step(store, id, to, n).await.status;
        }
        status
    }
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (store, seq) = (store.clone(), seq.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                let mut r = request(&format!("rand-{c}-{i}"));
                r.sender = SIGNERS[(c + i) % 2].into();
                let (req, _) = store.create_tx_request(&ctx(), &r).await.unwrap();
                walk(&store, req.id, &seq, 24).await;
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // Replacements are requests like any other: drive them too (they may end and be
    // replaced in turn), a bounded number of rounds.
    for _ in 0..6 {
        let pending = store.stranded_nonces().await.unwrap();
        if pending.is_empty() {
            break;
        }
        for s in pending {
            walk(&store, s.replacement, &seq, 24).await;
        }
    }

    let su = db.superuser().await;
    let requests: i64 = su
        .query_one(
            "SELECT count(*) FROM dalp_workflows.tx_requests WHERE replaces IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(requests as usize, CLIENTS * PER_CLIENT);
    // 1. From the transition history alone: who broadcast which nonce.
    let shared = su
        .query(
            "WITH b AS (
                 SELECT DISTINCT r.chain_id, r.sender, (t.detail->>'nonce')::bigint AS nonce, r.id, r.replaces
                   FROM dalp_workflows.tx_transitions t JOIN dalp_workflows.tx_requests r ON r.id = t.request_id
                  WHERE t.to_status = 'BROADCASTING')
             SELECT chain_id, encode(sender, 'hex'), nonce, count(*) FILTER (WHERE replaces IS NULL),
                    count(*) FILTER (WHERE replaces IS NOT NULL AND replaces NOT IN (
                        SELECT r2.id FROM dalp_workflows.tx_requests r2
                         WHERE r2.chain_id = b.chain_id AND r2.sender = b.sender AND r2.nonce = b.nonce))
               FROM b GROUP BY 1, 2, 3
             HAVING count(*) FILTER (WHERE replaces IS NULL) > 1
                 OR count(*) FILTER (WHERE replaces IS NOT NULL AND replaces NOT IN (
                        SELECT r2.id FROM dalp_workflows.tx_requests r2
                         WHERE r2.chain_id = b.chain_id AND r2.sender = b.sender AND r2.nonce = b.nonce)) > 0",
            &[],
        )
        .await
        .unwrap();
    let shared: Vec<String> = shared
        .iter()
        .map(|r| {
            format!(
                "signer {} nonce {}",
                r.get::<_, String>(1),
                r.get::<_, i64>(2)
            )
        })
        .collect();
    assert!(
        shared.is_empty(),
        "nonces broadcast by two requests: {shared:?}"
    );
    // A replacement broadcast only after the request it replaces had ended.
    let early: i64 = su
        .query_one(
            "SELECT count(*) FROM dalp_workflows.tx_requests r
               JOIN dalp_workflows.tx_transitions rb ON rb.request_id = r.id AND rb.to_status = 'BROADCASTING'
              WHERE r.replaces IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM dalp_workflows.tx_transitions e
                     WHERE e.request_id = r.replaces AND e.to_status IN ('FAILED', 'CANCELLED') AND e.id < rb.id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        early, 0,
        "a replacement broadcast while its original was live"
    );
    // 2. Every nonce below next_nonce: held by a live or mined request, or released and never
    //    broadcast; exactly one of these.
    let bad = su
        .query(
            "SELECT s.signer, n,
                    (SELECT count(*) FROM dalp_workflows.tx_requests r
                      WHERE r.chain_id = s.chain_id AND r.sender = s.signer AND r.nonce = n
                        AND r.status NOT IN ('FAILED', 'CANCELLED')) AS held,
                    EXISTS (SELECT 1 FROM dalp_workflows.released_nonces x
                             WHERE x.chain_id = s.chain_id AND x.signer = s.signer AND x.nonce = n) AS released,
                    EXISTS (SELECT 1 FROM dalp_workflows.broadcast_nonces b
                             WHERE b.chain_id = s.chain_id AND b.signer = s.signer AND b.nonce = n) AS broadcast
               FROM dalp_workflows.signer_nonces s, generate_series(0, s.next_nonce - 1) AS n",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .filter(|r| {
            let (held, released, broadcast): (i64, bool, bool) = (r.get(2), r.get(3), r.get(4));
            !((held == 1 && !released) || (held == 0 && released && !broadcast))
        })
        .map(|r| format!("nonce {} (held {}, released {}, broadcast {})", r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, bool>(3), r.get::<_, bool>(4)))
        .collect::<Vec<_>>();
    assert!(
        bad.is_empty(),
        "nonces neither held nor cleanly released: {bad:?}"
    );
    let (broadcasts, replacements): (i64, i64) = {
        let r = su
            .query_one(
                "SELECT (SELECT count(*) FROM dalp_workflows.broadcast_nonces),
                        (SELECT count(*) FROM dalp_workflows.tx_requests WHERE replaces IS NOT NULL)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    // The path that used to hand out broadcast nonces again was walked.
    let requeued_then_cancelled: i64 = su
        .query_one(
            "SELECT count(DISTINCT q.request_id) FROM dalp_workflows.tx_transitions q
               JOIN dalp_workflows.tx_transitions c ON c.request_id = q.request_id AND c.id > q.id
              WHERE q.from_status = 'DEAD_LETTER' AND q.to_status = 'QUEUED'
                AND c.from_status IN ('QUEUED', 'PREPARING', 'PENDING_APPROVAL') AND c.to_status = 'CANCELLED'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        requeued_then_cancelled > 0,
        "no dead-letter -> re-queue -> cancel walk"
    );
    eprintln!(
        "{requeued_then_cancelled} dead-lettered, re-queued then cancelled; {} requests from {CLIENTS} clients, {} transitions, {broadcasts} broadcasts, {replacements} replacements: 0 violations",
        CLIENTS * PER_CLIENT,
        seq.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        replacements > 0,
        "the walk never stranded a nonce: the test did not exercise it"
    );
}
