//! Group commit for audit events that need no transaction of their own (the API's
//! `api.request` record): callers hand their event to one writer task, which appends every
//! event waiting at that moment in one INSERT and one commit, and each caller returns only
//! after its batch committed — durable before the answer, as with one commit per event,
//! but the commit is shared. When the writer falls behind, callers wait for room in a
//! bounded queue (backpressure); nothing is dropped: a caller whose event could not be
//! appended gets the error (and the API then answers 503, never 2xx). One bad event does not
//! fail the others of its batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, OnceCell};

use crate::AuditEvent;

type Reply = oneshot::Sender<Result<(), String>>;
type Job = (AuditEvent, Instant, Reply);

/// What the writer did, for `/metrics`.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Events handed over to the writer.
    pub submitted: AtomicU64,
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub failed_batches: AtomicU64,
    /// Sum over events of the time from hand-over to commit, in microseconds.
    pub wait_micros: AtomicU64,
    /// The largest batch so far.
    pub max_batch: AtomicU64,
}

pub struct GroupWriter {
    pool: Pool,
    max_batch: usize,
    queue: usize,
    writers: usize,
    sender: OnceCell<mpsc::Sender<Job>>,
    stats: Arc<GroupStats>,
}

impl GroupWriter {
    /// A writer appending through `pool` (a role with INSERT on events), at most
    /// `max_batch` events per commit, at most `queue` events waiting. Its task starts with
    /// the first event.
    pub fn new(pool: Pool, max_batch: usize, queue: usize) -> GroupWriter {
        GroupWriter {
            pool,
            max_batch: max_batch.max(1),
            queue: queue.max(1),
            writers: 1,
            sender: OnceCell::new(),
            stats: Arc::default(),
        }
    }

    /// Up to `n` batches committing at once (each takes the events waiting when it
    /// starts); one by default. With batches of one and as many writers as clients this is
    /// one commit per event, concurrently — the path group commit replaces.
    pub fn with_writers(mut self, n: usize) -> GroupWriter {
        self.writers = n.max(1);
        self
    }

    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// Events handed over and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.sender
            .get()
            .map(|s| s.max_capacity() - s.capacity())
            .unwrap_or(0)
    }

    async fn sender(&self) -> &mpsc::Sender<Job> {
        self.sender
            .get_or_init(|| async {
                let (tx, rx) = mpsc::channel(self.queue);
                let rx = Arc::new(tokio::sync::Mutex::new(rx));
                for _ in 0..self.writers {
                    tokio::spawn(run(
                        self.pool.clone(),
                        rx.clone(),
                        self.max_batch,
                        self.stats.clone(),
                    ));
                }
                tx
            })
            .await
    }

    /// Appends `event`; returns once the commit that holds it is done.
    pub async fn record(&self, event: AuditEvent) -> Result<(), String> {
        let stopped = || "the audit writer stopped".to_string();
        let (tx, rx) = oneshot::channel();
        self.sender()
            .await
            .send((event, Instant::now(), tx))
            .await
            .map_err(|_| stopped())?;
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        rx.await.map_err(|_| stopped())?
    }
}

/// One INSERT (one commit) of `events`.
async fn append(pool: &Pool, events: &[AuditEvent]) -> Result<(), String> {
    let c = dalp_db::pool::checkout(pool, "audit")
        .await
        .map_err(|e| e.to_string())?;
    crate::record_many(&**c, events)
        .await
        .map_err(|e| dalp_db::connect::describe_error(&e))
}

async fn run(
    pool: Pool,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    stats: Arc<GroupStats>,
) {
    // The events of a batch, and who waits for each (same order).
    let mut events: Vec<AuditEvent> = Vec::with_capacity(max_batch);
    let mut waiting: Vec<(Instant, Reply)> = Vec::with_capacity(max_batch);
    loop {
        {
            // Take what waits now; other writers wait for the receiver meanwhile.
            let mut rx = rx.lock().await;
            let Some(mut job) = rx.recv().await else {
                return;
            };
            loop {
                let (event, at, reply) = job;
                events.push(event);
                waiting.push((at, reply));
                if waiting.len() >= max_batch {
                    break;
                }
                match rx.try_recv() {
                    Ok(next) => job = next,
                    Err(_) => break,
                }
            }
        }
        let mut results = vec![append(&pool, &events).await];
        if results[0].is_err() {
            stats.failed_batches.fetch_add(1, Ordering::Relaxed);
            if events.len() > 1 {
                // One bad event (say, a value over a column's limit) must not fail the
                // others: each is appended on its own, and only the bad one reports it.
                results.clear();
                for e in &events {
                    results.push(append(&pool, std::slice::from_ref(e)).await);
                }
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        stats
            .max_batch
            .fetch_max(events.len() as u64, Ordering::Relaxed);
        events.clear();
        for (i, (at, reply)) in waiting.drain(..).enumerate() {
            stats
                .wait_micros
                .fetch_add(at.elapsed().as_micros() as u64, Ordering::Relaxed);
            let _ = reply.send(results.get(i).unwrap_or(&results[0]).clone());
        }
    }
}
