//! Transaction requests: the legal lifecycle, refused transitions that change nothing,
//! deduplication within 24 hours, gap-free nonces under concurrency and after failures.

use std::collections::BTreeSet;
use std::time::Duration;

use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_testkit::{migrated_database, TestDb};
use dalp_workflows::{NewTxRequest, TransitionInput, TxStatus, WorkflowError, WorkflowStore};
use uuid::Uuid;

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
    let db = migrated_database().await;
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
    let db = migrated_database().await;
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
