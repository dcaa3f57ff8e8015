//! Recomputing the chain: every batch's link, hash and signature; every sealed event's hash
//! against the database; events missing only where a recorded retention drop explains them;
//! no unsealed event below the seal watermark; and, given a checkpoint exported earlier, that
//! the chain still reaches it.

use dalp_db::TypedClient;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use futures_util::TryStreamExt;
use serde::Serialize;
use tokio_postgres::Client;

use crate::chain::{self, Checkpoint, EVENT_COLUMNS};

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    BatchMissing { expected_batch: i64 },
    SequenceGap { batch: i64, expected_first_seq: i64 },
    BrokenLink { batch: i64 },
    BatchHashMismatch { batch: i64 },
    BadSignature { batch: i64 },
    EventDeleted { batch: i64, seq: i64, event_id: i64 },
    EventChanged { batch: i64, seq: i64, event_id: i64 },
    MerkleMismatch { batch: i64 },
    UnsealedEvent { event_id: i64 },
    CheckpointMissing { batch: i64 },
    CheckpointMismatch { batch: i64 },
    CheckpointForged { batch: i64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use Problem::*;
        match self {
            BatchMissing { expected_batch } => write!(f, "batch {expected_batch} is missing (chain truncated or batch deleted)"),
            SequenceGap { batch, expected_first_seq } => write!(f, "batch {batch} does not start at sequence {expected_first_seq}"),
            BrokenLink { batch } => write!(f, "batch {batch} does not link to the previous batch's hash"),
            BatchHashMismatch { batch } => write!(f, "batch {batch}'s stored hash does not match its contents"),
            BadSignature { batch } => write!(f, "batch {batch}'s signature is not valid under the audit key"),
            EventDeleted { batch, seq, event_id } => write!(f, "event {event_id} (sequence {seq}, batch {batch}) is gone and no retention drop explains it"),
            EventChanged { batch, seq, event_id } => write!(f, "event {event_id} (sequence {seq}, batch {batch}) was changed after sealing"),
            MerkleMismatch { batch } => write!(f, "batch {batch}'s event hashes do not give its Merkle root (events reordered?)"),
            UnsealedEvent { event_id } => write!(f, "event {event_id} sits below the seal watermark but is in no batch (inserted afterwards)"),
            CheckpointMissing { batch } => write!(f, "the checkpoint's batch {batch} is not in the chain (chain truncated)"),
            CheckpointMismatch { batch } => write!(f, "batch {batch} differs from the checkpoint"),
            CheckpointForged { batch } => write!(f, "the checkpoint for batch {batch} is not signed by the audit key"),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub batches: u64,
    pub events_checked: u64,
    pub events_retained: u64,
    pub last_seq: i64,
    pub problem: Option<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Verifies the whole chain. `client` needs SELECT on the audit tables (the auditor role).
pub async fn verify(
    client: &Client,
    public: &VerifyingKey,
    checkpoint: Option<&Checkpoint>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    verify_window(client, public, checkpoint, None, None).await
}

/// Verifies the batches sealed in `[from, to)` (either end open), linked to the batch just
/// before the window. The scan for unsealed events below the watermark needs the whole
/// chain, so it runs only without a window.
pub async fn verify_window(
    client: &Client,
    public: &VerifyingKey,
    checkpoint: Option<&Checkpoint>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let whole = from.is_none() && to.is_none();
    let mut report = VerifyReport::default();
    // Times before this were dropped under retention; events there may be missing.
    let retained_before: Option<DateTime<Utc>> = client
        .typed_query_one(
            "SELECT max(range_to) FROM dalp_audit.retention_log WHERE table_name = 'dalp_audit.events'",
            &[],
        )
        .await?
        .get(0);
    let batches = client
        .typed_query(
            "SELECT batch_no, first_seq, last_seq, event_ids, event_times, event_hashes, xmin_upper::text,
                    merkle_root, prev_hash, batch_hash, signature
               FROM dalp_audit.seal_batches
              WHERE ($1::timestamptz IS NULL OR sealed_at >= $1) AND ($2::timestamptz IS NULL OR sealed_at < $2)
              ORDER BY batch_no",
            &[&from, &to],
        )
        .await?;
    let mut prev_hash = vec![0u8; 32];
    let mut expected_seq = 1i64;
    let mut base = 1i64;
    if let Some(first) = batches.first() {
        let no: i64 = first.get(0);
        if no > 1 && !whole {
            // Anchor on the batch before the window.
            match client
                .typed_query_opt(
                    "SELECT batch_hash, last_seq FROM dalp_audit.seal_batches WHERE batch_no = $1",
                    &[&(no - 1)],
                )
                .await?
            {
                Some(r) => {
                    prev_hash = r.get(0);
                    expected_seq = r.get::<_, i64>(1) + 1;
                    base = no;
                }
                None => {
                    return Ok(VerifyReport {
                        problem: Some(Problem::BatchMissing {
                            expected_batch: no - 1,
                        }),
                        ..Default::default()
                    })
                }
            }
        }
    }
    let mut sealed: HashSet<i64> = HashSet::new();
    let mut watermark = 0u64;
    let mut hashes_by_batch: HashMap<i64, Vec<u8>> = HashMap::new();
    for (i, b) in batches.iter().enumerate() {
        let no: i64 = b.get(0);
        let fail = |r: &mut VerifyReport, p: Problem| {
            r.problem = Some(p);
        };
        if no != base + i as i64 {
            fail(
                &mut report,
                Problem::BatchMissing {
                    expected_batch: base + i as i64,
                },
            );
            return Ok(report);
        }
        let (first, last): (i64, i64) = (b.get(1), b.get(2));
        if first != expected_seq {
            fail(
                &mut report,
                Problem::SequenceGap {
                    batch: no,
                    expected_first_seq: expected_seq,
                },
            );
            return Ok(report);
        }
        let ids: Vec<i64> = b.get(3);
        let times: Vec<DateTime<Utc>> = b.get(4);
        let stored: Vec<Vec<u8>> = b.get(5);
        let upper: u64 = b.get::<_, &str>(6).parse().unwrap_or(0);
        let root: Vec<u8> = b.get(7);
        let link: Vec<u8> = b.get(8);
        let head: Vec<u8> = b.get(9);
        let sig: Vec<u8> = b.get(10);
        if link != prev_hash {
            fail(&mut report, Problem::BrokenLink { batch: no });
            return Ok(report);
        }
        let recomputed = chain::batch_hash(&link, no, first, last, &root, upper);
        if recomputed.as_slice() != head.as_slice() {
            fail(&mut report, Problem::BatchHashMismatch { batch: no });
            return Ok(report);
        }
        if !chain::signature_ok(public, &head, &sig) {
            fail(&mut report, Problem::BadSignature { batch: no });
            return Ok(report);
        }
        let leaves: Vec<[u8; 32]> = stored
            .iter()
            .map(|h| h.as_slice().try_into().unwrap_or([0u8; 32]))
            .collect();
        if chain::merkle_root(&leaves).as_slice() != root.as_slice() {
            fail(&mut report, Problem::MerkleMismatch { batch: no });
            return Ok(report);
        }
        // The events themselves, as they are now.
        let rows = client
            .typed_query(
                &format!("SELECT {EVENT_COLUMNS} FROM dalp_audit.events WHERE id = ANY($1)"),
                &[&ids],
            )
            .await?;
        let now: HashMap<i64, [u8; 32]> = rows
            .iter()
            .map(|r| (r.get(0), chain::event_hash(r)))
            .collect();
        for (k, id) in ids.iter().enumerate() {
            let seq = first + k as i64;
            match now.get(id) {
                Some(h) if h.as_slice() == stored[k].as_slice() => report.events_checked += 1,
                Some(_) => {
                    fail(
                        &mut report,
                        Problem::EventChanged {
                            batch: no,
                            seq,
                            event_id: *id,
                        },
                    );
                    return Ok(report);
                }
                None if retained_before.map(|t| times[k] < t).unwrap_or(false) => {
                    report.events_retained += 1
                }
                None => {
                    fail(
                        &mut report,
                        Problem::EventDeleted {
                            batch: no,
                            seq,
                            event_id: *id,
                        },
                    );
                    return Ok(report);
                }
            }
            if !sealed.insert(*id) {
                fail(
                    &mut report,
                    Problem::EventChanged {
                        batch: no,
                        seq,
                        event_id: *id,
                    },
                );
                return Ok(report);
            }
        }
        hashes_by_batch.insert(no, head.clone());
        prev_hash = head;
        expected_seq = last + 1;
        watermark = upper;
        report.batches += 1;
        report.last_seq = last;
    }

    if !whole {
        return Ok(report);
    }
    // Nothing may sit below the watermark outside the chain.
    let params: Vec<String> = vec![watermark.to_string()];
    let stream = client
        .query_raw(
            "SELECT id FROM dalp_audit.events WHERE txid < $1::text::xid8",
            params.iter(),
        )
        .await?;
    futures_util::pin_mut!(stream);
    while let Some(row) = stream.try_next().await? {
        let id: i64 = row.get(0);
        if !sealed.contains(&id) {
            report.problem = Some(Problem::UnsealedEvent { event_id: id });
            return Ok(report);
        }
    }

    if let Some(cp) = checkpoint {
        let cp_hash = hex::decode(&cp.batch_hash).unwrap_or_default();
        let cp_sig = hex::decode(&cp.signature).unwrap_or_default();
        if !chain::signature_ok(public, &cp_hash, &cp_sig) {
            report.problem = Some(Problem::CheckpointForged { batch: cp.batch_no });
        } else {
            match hashes_by_batch.get(&cp.batch_no) {
                None => report.problem = Some(Problem::CheckpointMissing { batch: cp.batch_no }),
                Some(h) if *h != cp_hash => {
                    report.problem = Some(Problem::CheckpointMismatch { batch: cp.batch_no })
                }
                Some(_) => {}
            }
        }
    }
    Ok(report)
}
