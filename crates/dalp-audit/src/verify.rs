//! Recomputing the chain: every batch's link, hash and signature under a trusted key named by
//! the batch; every sealed event's hash against the row with the sealed id and time; events
//! missing only where a recorded retention drop old enough under the policy explains them,
//! each drop's count matching; no unsealed event below the seal watermark, no second row
//! with a sealed id, no event with a transaction id that cannot exist; no protective trigger
//! disabled; and every head witnessed outside the database (or exported as a checkpoint)
//! still in the chain, unchanged.

use dalp_db::TypedClient;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use futures_util::TryStreamExt;
use serde::Serialize;
use tokio_postgres::Client;

use crate::chain::{self, Checkpoint, TrustedKeys, EVENT_COLUMNS};

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    BatchMissing {
        expected_batch: i64,
    },
    SequenceGap {
        batch: i64,
        expected_first_seq: i64,
    },
    BrokenLink {
        batch: i64,
    },
    BatchHashMismatch {
        batch: i64,
    },
    BadSignature {
        batch: i64,
    },
    EventDeleted {
        batch: i64,
        seq: i64,
        event_id: i64,
    },
    EventChanged {
        batch: i64,
        seq: i64,
        event_id: i64,
    },
    MerkleMismatch {
        batch: i64,
    },
    UnsealedEvent {
        event_id: i64,
    },
    CheckpointMissing {
        batch: i64,
    },
    CheckpointMismatch {
        batch: i64,
    },
    CheckpointForged {
        batch: i64,
    },
    UnknownKey {
        batch: i64,
        key_id: String,
    },
    DuplicateEventId {
        event_id: i64,
    },
    ImpossibleTxid {
        event_id: i64,
    },
    RetentionTooYoung {
        partition: String,
        range_to: DateTime<Utc>,
    },
    RetentionMismatch {
        partition: String,
        recorded: i64,
        missing: i64,
    },
    TriggerDisabled {
        table: String,
        trigger: String,
    },
    WrongSigner {
        batch: i64,
        key_id: String,
        expected: String,
    },
    BadRotation {
        batch: i64,
    },
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
            CheckpointMissing { batch } => write!(f, "the witnessed head at batch {batch} is not in the chain (chain truncated or wiped)"),
            CheckpointMismatch { batch } => write!(f, "batch {batch} differs from its witnessed head (chain rewritten or re-signed)"),
            CheckpointForged { batch } => write!(f, "the witnessed head for batch {batch} is not signed by a trusted audit key"),
            UnknownKey { batch, key_id } => write!(f, "batch {batch} is signed by {key_id}, which is not a trusted audit key"),
            DuplicateEventId { event_id } => write!(f, "a second event row carries the sealed id {event_id} (forged copy)"),
            ImpossibleTxid { event_id } => write!(f, "event {event_id} carries a transaction id that has not been issued yet (forged)"),
            RetentionTooYoung { partition, range_to } => write!(f, "retention entry for {partition} covers time up to {range_to}, younger than the retention policy allows (forged retention)"),
            RetentionMismatch { partition, recorded, missing } => write!(f, "retention entry for {partition} records {recorded} rows dropped, but {missing} sealed events are missing in its range"),
            TriggerDisabled { table, trigger } => write!(f, "protective trigger {trigger} on dalp_audit.{table} is disabled"),
            WrongSigner { batch, key_id, expected } => write!(f, "batch {batch} is signed by {key_id}, but only {expected} may sign it (keys change only by a rotation batch)"),
            BadRotation { batch } => write!(f, "rotation batch {batch} names a next key whose id does not match it"),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub batches: u64,
    pub events_checked: u64,
    pub events_retained: u64,
    pub last_seq: i64,
    /// Witnessed heads (and checkpoints) checked against the chain.
    pub heads_checked: u64,
    /// Heads outside a verified window (or before an incremental start), not checked.
    pub heads_skipped: u64,
    /// The newest batch verified and its hash (hex): where the next incremental run starts.
    pub last_batch: i64,
    pub last_hash: String,
    pub problem: Option<Problem>,
}

/// What to verify against.
#[derive(Debug, Clone)]
pub struct VerifyOptions<'a> {
    /// The keys batches may be signed by.
    pub keys: &'a TrustedKeys,
    /// Heads witnessed outside the database and checkpoints exported by hand: the chain must
    /// contain each, unchanged.
    pub heads: &'a [Checkpoint],
    /// Only batches sealed in `[from, to)` (either end open), linked to the batch before.
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// The retention policy: no retention drop may cover anything younger.
    pub retention_months: u32,
    /// Incremental: a head an earlier verification found intact. Only the batches after it
    /// are recomputed (anchored on its hash) and only events written since are scanned — in
    /// time proportional to what is new. Rewrites of older history that keep that batch's
    /// row are left to the next full verification.
    pub after: Option<&'a Checkpoint>,
}

impl<'a> VerifyOptions<'a> {
    pub fn new(keys: &'a TrustedKeys) -> VerifyOptions<'a> {
        VerifyOptions {
            keys,
            heads: &[],
            from: None,
            to: None,
            retention_months: crate::PARTITIONS.retention_months.unwrap_or(84),
            after: None,
        }
    }
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Verifies the whole chain under one key. `client` needs SELECT on the audit tables (the
/// auditor role).
pub async fn verify(
    client: &Client,
    public: &VerifyingKey,
    checkpoint: Option<&Checkpoint>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    verify_window(client, public, checkpoint, None, None).await
}

/// [`verify_with`] under one key, with at most one checkpoint.
pub async fn verify_window(
    client: &Client,
    public: &VerifyingKey,
    checkpoint: Option<&Checkpoint>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let keys = TrustedKeys::one(*public);
    let heads: Vec<Checkpoint> = checkpoint.into_iter().cloned().collect();
    verify_with(
        client,
        &VerifyOptions {
            heads: &heads,
            from,
            to,
            ..VerifyOptions::new(&keys)
        },
    )
    .await
}

/// One retention drop of an events partition.
struct Retained {
    partition: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    rows: i64,
    missing: i64,
}

/// Verifies the chain (or a window of it; the scans for unsealed, duplicated and forged
/// events and the retention counts need the whole chain, so they run only without one).
pub async fn verify_with(
    client: &Client,
    opts: &VerifyOptions<'_>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let (from, to) = (opts.from, opts.to);
    let windowed = from.is_some() || to.is_some();
    let whole = !windowed && opts.after.is_none();
    let mut report = VerifyReport::default();
    // The owner could switch the append-only triggers off and on again around an edit; the
    // edit itself shows in the hashes, a trigger left off shows here.
    if let Some(r) = client
        .typed_query_opt(
            "SELECT c.relname::text, t.tgname::text FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'dalp_audit' AND NOT t.tgisinternal AND t.tgenabled = 'D'
              ORDER BY 1, 2 LIMIT 1",
            &[],
        )
        .await?
    {
        report.problem = Some(Problem::TriggerDisabled {
            table: r.get(0),
            trigger: r.get(1),
        });
        return Ok(report);
    }
    // Partitions dropped under retention: events in their ranges may be missing, as many as
    // each drop recorded, and only in ranges older than the policy.
    let oldest_allowed = Utc::now()
        .checked_sub_months(chrono::Months::new(opts.retention_months))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut retained: Vec<Retained> = client
        .typed_query(
            "SELECT partition_name, range_from, range_to, rows_dropped FROM dalp_audit.retention_log
              WHERE table_name = 'dalp_audit.events' ORDER BY range_from",
            &[],
        )
        .await?
        .iter()
        .map(|r| Retained {
            partition: r.get(0),
            from: r.get(1),
            to: r.get(2),
            rows: r.get(3),
            missing: 0,
        })
        .collect();
    if let Some(r) = retained.iter().find(|r| r.to > oldest_allowed) {
        report.problem = Some(Problem::RetentionTooYoung {
            partition: r.partition.clone(),
            range_to: r.to,
        });
        return Ok(report);
    }
    let batches = client
        .typed_query(
            "SELECT batch_no, first_seq, last_seq, event_ids, event_times, event_hashes, xmin_upper::text,
                    merkle_root, prev_hash, batch_hash, signature, key_id, next_key_id, next_public
               FROM dalp_audit.seal_batches
              WHERE ($1::timestamptz IS NULL OR sealed_at >= $1) AND ($2::timestamptz IS NULL OR sealed_at < $2)
                AND ($3::bigint IS NULL OR batch_no > $3)
              ORDER BY batch_no",
            &[&from, &to, &opts.after.map(|a| a.batch_no)],
        )
        .await?;
    let mut prev_hash = vec![0u8; 32];
    let mut expected_seq = 1i64;
    let mut base = 1i64;
    // Events of transactions from here on are scanned (0: all).
    let mut scan_from = 0u64;
    // Trusted keys grow along rotation batches; each batch must be signed by the key the
    // one before it handed over to (or that signed it).
    let mut keys = opts.keys.clone();
    let mut signer: Option<String> = None;
    // Where the batches read continue from: the head verified before (incremental) or the
    // batch just before the window.
    let anchor_no = match (opts.after, batches.first()) {
        (Some(a), _) => Some(a.batch_no),
        (None, Some(first)) if !whole && first.get::<_, i64>(0) > 1 => {
            Some(first.get::<_, i64>(0) - 1)
        }
        _ => None,
    };
    if let Some(no) = anchor_no {
        let row = client
            .typed_query_opt(
                "SELECT batch_hash, last_seq, xmin_upper::text, coalesce(next_key_id, key_id)
                   FROM dalp_audit.seal_batches WHERE batch_no = $1",
                &[&no],
            )
            .await?;
        let Some(r) = row else {
            report.problem = Some(match opts.after {
                Some(_) => Problem::CheckpointMissing { batch: no },
                None => Problem::BatchMissing { expected_batch: no },
            });
            return Ok(report);
        };
        prev_hash = r.get(0);
        expected_seq = r.get::<_, i64>(1) + 1;
        base = no + 1;
        signer = Some(r.get(3));
        if let Some(a) = opts.after {
            // The verified head must still be there, unchanged; the chain continues from it.
            if hex::encode(&prev_hash) != a.batch_hash {
                report.problem = Some(Problem::CheckpointMismatch { batch: no });
                return Ok(report);
            }
            scan_from = r.get::<_, &str>(2).parse().unwrap_or(0);
            report.last_batch = no;
            report.last_hash = a.batch_hash.clone();
            report.last_seq = a.last_seq;
        }
        // Keys handed over up to the anchor: each rotation signed by a key trusted so far.
        for r in client
            .typed_query(
                "SELECT batch_no, key_id, batch_hash, signature, next_key_id, next_public
                   FROM dalp_audit.seal_batches WHERE batch_no <= $1 AND next_key_id IS NOT NULL
                  ORDER BY batch_no",
                &[&no],
            )
            .await?
        {
            let (rotation, by): (i64, String) = (r.get(0), r.get(1));
            let (hash, sig): (Vec<u8>, Vec<u8>) = (r.get(2), r.get(3));
            let next = chain::NextKey {
                key_id: r.get(4),
                public: r.get(5),
            };
            let signed = keys
                .get(&by)
                .is_some_and(|k| chain::signature_ok(k, &hash, &sig));
            match (signed, chain::next_public(&next)) {
                (true, Some(public)) => keys.add(public),
                _ => {
                    report.problem = Some(Problem::BadRotation { batch: rotation });
                    return Ok(report);
                }
            }
        }
    }
    // Sealed events by (id, time in µs), and their ids.
    let mut sealed: HashSet<(i64, i64)> = HashSet::new();
    let mut sealed_ids: HashSet<i64> = HashSet::new();
    let mut watermark = scan_from;
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
        let next: Option<chain::NextKey> =
            b.get::<_, Option<String>>(12).map(|key_id| chain::NextKey {
                key_id,
                public: b.get::<_, Option<Vec<u8>>>(13).unwrap_or_default(),
            });
        let recomputed = chain::batch_hash(&link, no, first, last, &root, upper, next.as_ref());
        if recomputed.as_slice() != head.as_slice() {
            fail(&mut report, Problem::BatchHashMismatch { batch: no });
            return Ok(report);
        }
        let key_id: String = b.get(11);
        if let Some(expected) = signer.as_ref().filter(|e| **e != key_id) {
            let expected = expected.clone();
            fail(
                &mut report,
                Problem::WrongSigner {
                    batch: no,
                    key_id,
                    expected,
                },
            );
            return Ok(report);
        }
        let Some(public) = keys.get(&key_id) else {
            fail(&mut report, Problem::UnknownKey { batch: no, key_id });
            return Ok(report);
        };
        if !chain::signature_ok(public, &head, &sig) {
            fail(&mut report, Problem::BadSignature { batch: no });
            return Ok(report);
        }
        signer = Some(match &next {
            Some(n) => {
                let Some(public) = chain::next_public(n) else {
                    fail(&mut report, Problem::BadRotation { batch: no });
                    return Ok(report);
                };
                keys.add(public);
                n.key_id.clone()
            }
            None => key_id,
        });
        let leaves: Vec<[u8; 32]> = stored
            .iter()
            .map(|h| h.as_slice().try_into().unwrap_or([0u8; 32]))
            .collect();
        if chain::merkle_root(&leaves).as_slice() != root.as_slice() {
            fail(&mut report, Problem::MerkleMismatch { batch: no });
            return Ok(report);
        }
        // The events themselves, as they are now: the rows with the sealed id and time (a
        // forged copy of an id elsewhere is not looked at here; the scan below finds it).
        let rows = client
            .typed_query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM dalp_audit.events
                      WHERE (id, occurred_at) IN (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]))"
                ),
                &[&ids, &times],
            )
            .await?;
        let now: HashMap<(i64, i64), [u8; 32]> = rows
            .iter()
            .map(|r| {
                let at: DateTime<Utc> = r.get(1);
                ((r.get(0), at.timestamp_micros()), chain::event_hash(r))
            })
            .collect();
        for (k, id) in ids.iter().enumerate() {
            let seq = first + k as i64;
            let key = (*id, times[k].timestamp_micros());
            let covering = retained
                .iter_mut()
                .find(|r| r.from <= times[k] && times[k] < r.to);
            match now.get(&key) {
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
                None if covering.is_some() => {
                    if let Some(r) = covering {
                        r.missing += 1;
                    }
                    report.events_retained += 1
                }
                None => {
                    // Gone, or still there under another time (the row's time or the
                    // batch's list was edited).
                    let elsewhere = client
                        .typed_query_opt(
                            "SELECT 1 FROM dalp_audit.events WHERE id = $1 LIMIT 1",
                            &[id],
                        )
                        .await?
                        .is_some();
                    let (batch, event_id) = (no, *id);
                    fail(
                        &mut report,
                        if elsewhere {
                            Problem::EventChanged {
                                batch,
                                seq,
                                event_id,
                            }
                        } else {
                            Problem::EventDeleted {
                                batch,
                                seq,
                                event_id,
                            }
                        },
                    );
                    return Ok(report);
                }
            }
            if !sealed.insert(key) || !sealed_ids.insert(*id) {
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
        report.last_batch = no;
        report.last_hash = hex::encode(&head);
        prev_hash = head;
        expected_seq = last + 1;
        watermark = upper;
        report.batches += 1;
        report.last_seq = last;
    }

    if windowed {
        check_heads(opts, &keys, &hashes_by_batch, &mut report);
        return Ok(report);
    }
    // Each retention drop removed exactly what it recorded.
    if let Some(r) = retained.iter().find(|r| whole && r.missing != r.rows) {
        report.problem = Some(Problem::RetentionMismatch {
            partition: r.partition.clone(),
            recorded: r.rows,
            missing: r.missing,
        });
        return Ok(report);
    }
    // Every row outside the chain: none below the watermark (inserted afterwards), none
    // carrying a sealed id (a forged copy), none with a transaction id not issued yet (it
    // could never be sealed). The snapshot's xmax comes from the same statement, so every
    // genuinely committed row is below it.
    let stream = client
        .query_raw(
            "SELECT id, occurred_at, txid::text, (SELECT pg_snapshot_xmax(pg_current_snapshot()))::text
               FROM dalp_audit.events WHERE txid >= $1::text::xid8",
            [scan_from.to_string()],
        )
        .await?;
    futures_util::pin_mut!(stream);
    while let Some(row) = stream.try_next().await? {
        let id: i64 = row.get(0);
        let at: DateTime<Utc> = row.get(1);
        if sealed.contains(&(id, at.timestamp_micros())) {
            continue;
        }
        let txid: u64 = row.get::<_, &str>(2).parse().unwrap_or(u64::MAX);
        let xmax: u64 = row.get::<_, &str>(3).parse().unwrap_or(0);
        report.problem = if txid >= xmax {
            Some(Problem::ImpossibleTxid { event_id: id })
        } else if sealed_ids.contains(&id) {
            Some(Problem::DuplicateEventId { event_id: id })
        } else if txid < watermark {
            Some(Problem::UnsealedEvent { event_id: id })
        } else {
            continue;
        };
        return Ok(report);
    }
    check_heads(opts, &keys, &hashes_by_batch, &mut report);
    Ok(report)
}

/// Every witnessed head: signed by a trusted key, in the chain, unchanged. In a window only
/// the heads of verified batches can be checked; the others are counted as skipped.
fn check_heads(
    opts: &VerifyOptions<'_>,
    keys: &TrustedKeys,
    hashes_by_batch: &HashMap<i64, Vec<u8>>,
    report: &mut VerifyReport,
) {
    let whole = opts.from.is_none() && opts.to.is_none();
    let verified_before = opts.after.map(|a| a.batch_no).unwrap_or(0);
    for head in opts.heads {
        let hash = hex::decode(&head.batch_hash).unwrap_or_default();
        let sig = hex::decode(&head.signature).unwrap_or_default();
        let signed = keys
            .get(&head.key_id)
            .is_some_and(|k| chain::signature_ok(k, &hash, &sig));
        let problem = if !signed {
            Some(Problem::CheckpointForged {
                batch: head.batch_no,
            })
        } else {
            match hashes_by_batch.get(&head.batch_no) {
                None if !whole || head.batch_no <= verified_before => {
                    report.heads_skipped += 1;
                    continue;
                }
                None => Some(Problem::CheckpointMissing {
                    batch: head.batch_no,
                }),
                Some(h) if *h != hash => Some(Problem::CheckpointMismatch {
                    batch: head.batch_no,
                }),
                Some(_) => None,
            }
        };
        if problem.is_some() {
            report.problem = problem;
            return;
        }
        report.heads_checked += 1;
    }
}
