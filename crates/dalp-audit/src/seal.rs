//! The sealer: gives committed events a gap-free sequence and chains them into signed
//! batches, without any lock on the writers' path.
//!
//! Sequence values are allocated before commit, so ids do not tell commit order. The sealer
//! instead takes `xmin` of a fresh snapshot: every transaction below it has ended, so all of
//! its events are visible now and no more can appear. Each batch seals exactly the events of
//! transactions in `[previous xmin_upper, xmin_upper)`; a transaction still running stays
//! above the watermark until it ends, so a late commit is sealed later, never skipped.

use dalp_db::TypedClient;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::Row;

use crate::chain::{self, AuditKey, Checkpoint, EVENT_COLUMNS};
use crate::witness::Witness;

/// Advisory lock key ("dalpseal") that keeps two sealers from racing each other (writers
/// never take it).
const SEAL_LOCK: i64 = 0x6461_6c70_7365_616c;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("unexpected value: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Behind(String),
    #[error("batch {batch} is signed by audit key {chain_key}, but this sealer holds {own_key}: the signing key was replaced; restore the original key file (a new key never continues an existing chain)")]
    KeyMismatch {
        batch: i64,
        chain_key: String,
        own_key: String,
    },
    #[error(transparent)]
    Witness(#[from] crate::witness::WitnessError),
}

#[derive(Debug, Clone)]
pub struct SealReport {
    pub batch_no: i64,
    pub events: usize,
    pub last_seq: i64,
}

/// Where the chain ends: what the next batch continues from.
struct Tail {
    batch_no: i64,
    last_seq: i64,
    hash: Vec<u8>,
    xmin_upper: u64,
    /// The key that must sign the next batch.
    signer: String,
}

/// The chain's last batch, read inside the sealing transaction.
async fn tail(tx: &tokio_postgres::Transaction<'_>) -> Result<Option<Tail>, SealError> {
    let row = tx
        .typed_query_opt(
            "SELECT batch_no, last_seq, batch_hash, xmin_upper::text, coalesce(next_key_id, key_id)
               FROM dalp_audit.seal_batches ORDER BY batch_no DESC LIMIT 1",
            &[],
        )
        .await?;
    row.map(|r| {
        Ok(Tail {
            batch_no: r.get(0),
            last_seq: r.get(1),
            hash: r.get(2),
            xmin_upper: parse_xid(r.get(3))?,
            signer: r.get(4),
        })
    })
    .transpose()
}

/// One batch as stored.
struct NewBatch<'a> {
    batch_no: i64,
    first_seq: i64,
    last_seq: i64,
    ids: &'a [i64],
    times: &'a [DateTime<Utc>],
    hashes: &'a [[u8; 32]],
    upper: u64,
    prev_hash: &'a [u8],
    next_key: Option<&'a chain::NextKey>,
}

impl NewBatch<'_> {
    /// Hashes, signs with `key` and inserts the batch.
    async fn append(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        key: &AuditKey,
    ) -> Result<(), SealError> {
        let root = chain::merkle_root(self.hashes);
        let head = chain::batch_hash(
            self.prev_hash,
            self.batch_no,
            self.first_seq,
            self.last_seq,
            &root,
            self.upper,
            self.next_key,
        );
        let signature = key.sign(&head);
        let hash_vecs: Vec<Vec<u8>> = self.hashes.iter().map(|h| h.to_vec()).collect();
        tx.typed_execute(
            "INSERT INTO dalp_audit.seal_batches (batch_no, first_seq, last_seq, event_ids, event_times, event_hashes,
                 xmin_upper, merkle_root, prev_hash, batch_hash, key_id, signature, next_key_id, next_public)
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::xid8, $8, $9, $10, $11, $12, $13, $14)",
            &[
                &self.batch_no,
                &self.first_seq,
                &self.last_seq,
                &self.ids,
                &self.times,
                &hash_vecs,
                &self.upper.to_string(),
                &root.to_vec(),
                &self.prev_hash,
                &head.to_vec(),
                &key.key_id,
                &signature,
                &self.next_key.map(|k| k.key_id.clone()),
                &self.next_key.map(|k| k.public.clone()),
            ],
        )
        .await?;
        Ok(())
    }
}

/// Seals as the `dalp_audit_sealer` role.
pub struct Sealer {
    pool: Pool,
    key: std::sync::RwLock<Arc<AuditKey>>,
    /// Where the signing key lives: after a rotation the running sealer picks up the next
    /// key from here.
    key_file: Option<std::path::PathBuf>,
    /// Most events per batch.
    pub max_batch: usize,
    /// Where the signed head is witnessed, and how often.
    witness: Option<(Witness, Duration)>,
}

fn parse_xid(s: &str) -> Result<u64, SealError> {
    s.parse()
        .map_err(|_| SealError::Corrupt(format!("xid8 `{s}`")))
}

impl Sealer {
    pub fn new(pool: Pool, key: Arc<AuditKey>) -> Sealer {
        Sealer {
            pool,
            key: std::sync::RwLock::new(key),
            key_file: None,
            max_batch: 5_000,
            witness: None,
        }
    }

    /// Re-reads the signing key from `path` when the chain has rotated to the key there.
    pub fn with_key_file(mut self, path: impl Into<std::path::PathBuf>) -> Sealer {
        self.key_file = Some(path.into());
        self
    }

    fn key(&self) -> Arc<AuditKey> {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The key that must sign the next batch: the one the chain rotated to, else the one
    /// that signed the last batch. Ours, or the key file's after a rotation (then it
    /// becomes ours); anything else stops sealing.
    fn signer_for(&self, batch: i64, expected: String) -> Result<Arc<AuditKey>, SealError> {
        let own = self.key();
        if own.key_id == expected {
            return Ok(own);
        }
        if let Some(path) = &self.key_file {
            if let Ok(k) = AuditKey::open(path) {
                if k.key_id == expected {
                    let k = Arc::new(k);
                    *self.key.write().unwrap_or_else(|e| e.into_inner()) = k.clone();
                    tracing::info!(key_id = %k.key_id, "audit signing key rotated");
                    return Ok(k);
                }
            }
        }
        Err(SealError::KeyMismatch {
            batch,
            chain_key: expected,
            own_key: own.key_id.clone(),
        })
    }

    /// Also publishes the signed chain head to `witness` (when it moved) every `every`.
    pub fn with_witness(mut self, witness: Witness, every: Duration) -> Sealer {
        self.witness = Some((witness, every));
        self
    }

    /// Appends the current head to the witness, if one is configured and the head moved.
    /// Returns the head witnessed.
    pub async fn witness_now(&self) -> Result<Option<Checkpoint>, SealError> {
        let Some((witness, _)) = &self.witness else {
            return Ok(None);
        };
        let client = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let Some(head) = Sealer::checkpoint(&client).await? else {
            return Ok(None);
        };
        Ok(witness.append(&head)?.then_some(head))
    }

    /// Seals what is sealable now, as one batch (or nothing). Returns the batch written.
    pub async fn seal_once(&self) -> Result<Option<SealReport>, SealError> {
        let mut client = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let tx = client.transaction().await?;
        tx.typed_execute("SELECT pg_advisory_xact_lock($1)", &[&SEAL_LOCK])
            .await?;
        // Read committed: each statement below sees everything committed before it started.
        let xmin = parse_xid(
            tx.typed_query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
                .await?
                .get(0),
        )?;
        let last = tail(&tx).await?;
        let (batch_no, first_seq, prev_hash, from, key) = match last {
            Some(t) => (
                t.batch_no + 1,
                t.last_seq + 1,
                t.hash,
                t.xmin_upper,
                self.signer_for(t.batch_no, t.signer)?,
            ),
            None => (1, 1, vec![0u8; 32], 0, self.key()),
        };
        if xmin <= from {
            return Ok(None);
        }
        let limit = self.max_batch as i64;
        let mut rows: Vec<Row> = tx
            .typed_query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM dalp_audit.events
                      WHERE txid >= $1::text::xid8 AND txid < $2::text::xid8
                      ORDER BY txid, id LIMIT $3"
                ),
                &[&from.to_string(), &xmin.to_string(), &limit],
            )
            .await?;
        let mut upper = xmin;
        if rows.len() == self.max_batch {
            // Cut at a transaction boundary: the last transaction's events go whole.
            let last_tx = parse_xid(rows[rows.len() - 1].get(2))?;
            rows.retain(|r| r.get::<_, String>(2) != last_tx.to_string());
            if rows.is_empty() {
                rows = tx
                    .typed_query(
                        &format!("SELECT {EVENT_COLUMNS} FROM dalp_audit.events WHERE txid = $1::text::xid8 ORDER BY id"),
                        &[&last_tx.to_string()],
                    )
                    .await?;
                upper = last_tx + 1;
            } else {
                upper = last_tx;
            }
        }
        if rows.is_empty() {
            // Nothing ended with events in it; the watermark can stay where it is.
            return Ok(None);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(1)).collect();
        let hashes: Vec<[u8; 32]> = rows.iter().map(chain::event_hash).collect();
        let last_seq = first_seq + ids.len() as i64 - 1;
        NewBatch {
            batch_no,
            first_seq,
            last_seq,
            ids: &ids,
            times: &times,
            hashes: &hashes,
            upper,
            prev_hash: &prev_hash,
            next_key: None,
        }
        .append(&tx, &key)
        .await?;
        tx.commit().await?;
        Ok(Some(SealReport {
            batch_no,
            events: ids.len(),
            last_seq,
        }))
    }

    /// Rotates the signing key: seals what is sealable, then appends an event-less batch,
    /// signed by the current key, that names `next` (inside its hash). From then on only
    /// `next` may sign. Returns the rotation batch's number.
    pub async fn rotate(&self, next: &AuditKey) -> Result<i64, SealError> {
        self.seal_all().await?;
        let mut client = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let tx = client.transaction().await?;
        tx.typed_execute("SELECT pg_advisory_xact_lock($1)", &[&SEAL_LOCK])
            .await?;
        let (batch_no, last_seq, prev_hash, upper, key) = match tail(&tx).await? {
            Some(t) => (
                t.batch_no + 1,
                t.last_seq,
                t.hash,
                t.xmin_upper,
                self.signer_for(t.batch_no, t.signer)?,
            ),
            None => (1, 0, vec![0u8; 32], 0, self.key()),
        };
        NewBatch {
            batch_no,
            first_seq: last_seq + 1,
            last_seq,
            ids: &[],
            times: &[],
            hashes: &[],
            upper,
            prev_hash: &prev_hash,
            next_key: Some(&next.as_next()),
        }
        .append(&tx, &key)
        .await?;
        tx.commit().await?;
        Ok(batch_no)
    }

    /// Seals until nothing is left (for tests, exports and shutdown).
    pub async fn seal_all(&self) -> Result<u64, SealError> {
        let mut n = 0;
        while let Some(r) = self.seal_once().await? {
            n += r.events as u64;
        }
        Ok(n)
    }

    /// Committed events not yet sealed.
    pub async fn pending(&self) -> Result<i64, SealError> {
        let client = dalp_db::pool::checkout(&self.pool, "audit").await?;
        Ok(client
            .typed_query_one(
                "SELECT count(*) FROM dalp_audit.events
                  WHERE txid >= coalesce((SELECT xmin_upper FROM dalp_audit.seal_batches ORDER BY batch_no DESC LIMIT 1), '0'::xid8)",
                &[],
            )
            .await?
            .get(0))
    }

    /// Seals until every event committed so far is sealed, or `timeout` passes. Transaction
    /// ids are cluster-wide, so an old open transaction anywhere in the cluster (any
    /// database) holds the watermark back; this waits it out. Returns the events sealed.
    pub async fn seal_caught_up(&self, timeout: Duration) -> Result<u64, SealError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut n = self.seal_all().await?;
        while self.pending().await? > 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(SealError::Behind(format!(
                    "events still unsealed after {timeout:?}: a long-running transaction in the cluster holds the seal watermark back"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            n += self.seal_all().await?;
        }
        Ok(n)
    }

    /// Seals every `interval` (and witnesses the head at the witness interval) until the
    /// task is aborted. A replaced signing key stops sealing, loudly, until it is restored.
    pub fn spawn(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_problem: Option<String> = None;
            let mut witnessed_at: Option<tokio::time::Instant> = None;
            loop {
                let mut result = self.seal_all().await.map(|_| ());
                if let (Ok(()), Some((_, every))) = (&result, &self.witness) {
                    if witnessed_at.is_none_or(|t| t.elapsed() >= *every) {
                        result = self.witness_now().await.map(|_| ());
                        witnessed_at = Some(tokio::time::Instant::now());
                    }
                }
                match result {
                    Ok(()) => last_problem = None,
                    Err(e) => {
                        let message = e.to_string();
                        if last_problem.as_deref() != Some(&message) {
                            match e {
                                SealError::KeyMismatch { .. } => tracing::error!("{message}"),
                                _ => tracing::warn!(error = %message, "sealing failed; retrying"),
                            }
                            last_problem = Some(message);
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// The latest signed batch head, if any. Any role that reads `seal_batches` may ask.
    pub async fn checkpoint(
        client: &tokio_postgres::Client,
    ) -> Result<Option<Checkpoint>, SealError> {
        Sealer::checkpoint_where(client, None).await
    }

    /// The key that must sign the next batch (the one the chain last handed over to, or
    /// that signed its last batch); none before the first batch. Any role that reads
    /// `seal_batches` may ask.
    pub async fn next_signer(client: &tokio_postgres::Client) -> Result<Option<String>, SealError> {
        Ok(client
            .typed_query_opt(
                "SELECT coalesce(next_key_id, key_id) FROM dalp_audit.seal_batches
                  ORDER BY batch_no DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// The signed head of batch `batch_no`, if it exists.
    pub async fn checkpoint_of(
        client: &tokio_postgres::Client,
        batch_no: i64,
    ) -> Result<Option<Checkpoint>, SealError> {
        Sealer::checkpoint_where(client, Some(batch_no)).await
    }

    async fn checkpoint_where(
        client: &tokio_postgres::Client,
        batch_no: Option<i64>,
    ) -> Result<Option<Checkpoint>, SealError> {
        let row = client
            .typed_query_opt(
                "SELECT batch_no, last_seq, batch_hash, key_id, signature, sealed_at FROM dalp_audit.seal_batches
                  WHERE $1::bigint IS NULL OR batch_no = $1
                  ORDER BY batch_no DESC LIMIT 1",
                &[&batch_no],
            )
            .await?;
        Ok(row.map(|r| Checkpoint {
            batch_no: r.get(0),
            last_seq: r.get(1),
            batch_hash: hex::encode(r.get::<_, Vec<u8>>(2)),
            key_id: r.get(3),
            signature: hex::encode(r.get::<_, Vec<u8>>(4)),
            sealed_at: r.get(5),
        }))
    }

    /// Seconds since the oldest event that is committed but not yet sealed (0 when none).
    pub async fn lag(pool: &Pool) -> Result<f64, SealError> {
        let client = dalp_db::pool::checkout(pool, "audit").await?;
        let row = client
            .typed_query_one(
                "SELECT coalesce(extract(epoch FROM now() - min(e.occurred_at))::float8, 0)
                   FROM dalp_audit.events e
                  WHERE e.txid >= coalesce((SELECT xmin_upper FROM dalp_audit.seal_batches ORDER BY batch_no DESC LIMIT 1), '0'::xid8)",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }
}
