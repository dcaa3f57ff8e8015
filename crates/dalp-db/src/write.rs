//! The one way a store changes data.
//!
//! A store holds a [`Writer`] (its pool, its name and, when it caches, its cache and NOTIFY
//! channel). Every change goes the same way:
//!
//! ```text
//! let mut conn = self.writer.checkout().await?;        // pool wait measured
//! let mut tx = conn.begin("identity.create_user").await?;
//! tx.typed_execute(…).await?;                           // the change
//! tx.record(&event).await?;                             // its audit record, same transaction
//! tx.invalidate([format!("user:{id}")]);                // cache entries it replaces
//! tx.commit().await?;                                   // NOTIFY, COMMIT, local eviction
//! ```
//!
//! [`Write::commit`] refuses (and rolls back) a change that recorded nothing: a change
//! without an audit record must say why with [`Write::commit_unaudited`] (indexing a chain,
//! a session's own bookkeeping). Outcomes are counted per store and operation for
//! `/metrics` ([`render`]): committed, rolled back (an error or an early return before
//! commit), or failed at commit.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, OnceLock};

use deadpool_postgres::{Object, Pool, PoolError, Transaction};

use crate::cache::Invalidate;

/// What must commit together with a change: the audit record. Implemented by
/// `dalp_audit::AuditEvent`.
pub trait Record: Sync {
    fn insert(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

/// Why a change did not commit.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// A programming error: the change recorded no audit record and gave no reason.
    #[error("{0} changed data without an audit record; the change was rolled back")]
    Unaudited(&'static str),
}

/// A store's way to its pool, with the cache its changes invalidate.
#[derive(Clone)]
pub struct Writer {
    pool: Pool,
    store: &'static str,
    cache: Option<(&'static str, Arc<dyn Invalidate>)>,
}

impl Writer {
    /// Changes through `pool`, counted under `store`.
    pub fn new(pool: Pool, store: &'static str) -> Writer {
        Writer {
            pool,
            store,
            cache: None,
        }
    }

    /// Invalidations go to `cache` in this process at commit and to the others through
    /// one NOTIFY on `channel`, sent inside the transaction.
    pub fn invalidating(mut self, channel: &'static str, cache: Arc<dyn Invalidate>) -> Writer {
        self.cache = Some((channel, cache));
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn store(&self) -> &'static str {
        self.store
    }

    /// A change of one or more statements that each commit by themselves (no transaction
    /// of its own, so no BEGIN/COMMIT round trips) and have no audit record, for the reason
    /// given: a work queue's claim, heartbeat or finish. `f` runs on a pooled connection;
    /// its outcome is counted like any other change's (an error is counted as failed).
    pub async fn autocommit<T, E, F>(
        &self,
        op: &'static str,
        _why: &'static str,
        f: F,
    ) -> Result<T, E>
    where
        F: AsyncFnOnce(&Object) -> Result<T, E>,
        E: From<PoolError>,
    {
        let client = crate::pool::checkout(&self.pool, self.store).await?;
        let result = f(&client).await;
        count(self.store, op, if result.is_ok() { 0 } else { 2 });
        result
    }

    /// A connection from the pool (the wait is measured per store).
    pub async fn checkout(&self) -> Result<Conn<'_>, PoolError> {
        Ok(Conn {
            writer: self,
            client: crate::pool::checkout(&self.pool, self.store).await?,
        })
    }
}

/// A pooled connection on which changes begin. Dereferences to the pooled client for reads.
pub struct Conn<'w> {
    writer: &'w Writer,
    client: Object,
}

impl Deref for Conn<'_> {
    type Target = Object;
    fn deref(&self) -> &Object {
        &self.client
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Object {
        &mut self.client
    }
}

impl<'w> Conn<'w> {
    /// Opens the transaction of operation `op` (named like its tracing span,
    /// `<store>.<method>`).
    pub async fn begin(&mut self, op: &'static str) -> Result<Write<'_>, tokio_postgres::Error> {
        let writer = self.writer;
        let tx = self.client.transaction().await?;
        Ok(Write {
            tx: Some(tx),
            writer,
            op,
            tags: Vec::new(),
            audited: false,
        })
    }
}

/// One change in progress. Dereferences to its transaction; dropping it uncommitted rolls
/// back.
pub struct Write<'c> {
    tx: Option<Transaction<'c>>,
    writer: &'c Writer,
    op: &'static str,
    tags: Vec<String>,
    audited: bool,
}

impl<'c> Deref for Write<'c> {
    type Target = Transaction<'c>;
    fn deref(&self) -> &Transaction<'c> {
        self.tx
            .as_ref()
            .expect("a write is used only until it ends")
    }
}

impl DerefMut for Write<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.tx
            .as_mut()
            .expect("a write is used only until it ends")
    }
}

impl Write<'_> {
    /// Inserts `record` (the change's audit record) in this transaction.
    pub async fn record<R: Record + ?Sized>(
        &mut self,
        record: &R,
    ) -> Result<(), tokio_postgres::Error> {
        let tx: &tokio_postgres::Transaction<'_> = self
            .tx
            .as_ref()
            .expect("a write is used only until it ends");
        record.insert(tx).await?;
        self.audited = true;
        Ok(())
    }

    /// Names the cache tags the change replaces (`user:<id>`, `*` for everything).
    pub fn invalidate(&mut self, tags: impl IntoIterator<Item = String>) {
        self.tags.extend(tags);
    }

    /// Commits the change with its audit record; refuses one without.
    pub async fn commit(self) -> Result<(), WriteError> {
        if !self.audited {
            tracing::error!(
                operation = self.op,
                "a change without an audit record was rolled back"
            );
            return Err(WriteError::Unaudited(self.op));
        }
        self.finish().await
    }

    /// Commits a change that has no audit record of its own, for the reason given (kept in
    /// the code, where a reviewer reads it).
    pub async fn commit_unaudited(self, _why: &'static str) -> Result<(), WriteError> {
        self.finish().await
    }

    async fn finish(mut self) -> Result<(), WriteError> {
        let tx = self.tx.take().expect("a write ends once");
        let result = async {
            if let (Some((channel, _)), false) = (&self.writer.cache, self.tags.is_empty()) {
                crate::cache::notify(&*tx, channel, &self.tags).await?;
            }
            tx.commit().await
        }
        .await;
        count(
            self.writer.store,
            self.op,
            if result.is_ok() { 0 } else { 2 },
        );
        result?;
        if let Some((_, cache)) = &self.writer.cache {
            let tags: Vec<&str> = self.tags.iter().map(String::as_str).collect();
            if !tags.is_empty() {
                cache.invalidate(&tags);
            }
        }
        Ok(())
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        // Still open: an error or an early return; the transaction rolls back as it drops.
        if self.tx.is_some() {
            count(self.writer.store, self.op, 1);
        }
    }
}

const OUTCOMES: [&str; 3] = ["committed", "rolled_back", "failed"];

type Counts = BTreeMap<(&'static str, &'static str), [u64; 3]>;

fn counts() -> &'static Mutex<Counts> {
    static C: OnceLock<Mutex<Counts>> = OnceLock::new();
    C.get_or_init(Default::default)
}

fn count(store: &'static str, op: &'static str, outcome: usize) {
    counts()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((store, op))
        .or_default()[outcome] += 1;
}

/// How often `op` ended as `outcome` ("committed", "rolled_back", "failed") in this process.
pub fn outcomes(op: &str, outcome: &str) -> u64 {
    let i = OUTCOMES.iter().position(|o| *o == outcome);
    counts()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|((_, o), _)| *o == op)
        .map(|(_, c)| i.map_or(0, |i| c[i]))
        .sum()
}

/// Prometheus text of the write outcomes counted so far.
pub fn render(out: &mut String) {
    use std::fmt::Write as _;
    let name = "dalp_store_writes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Store changes by operation and outcome (committed, rolled_back on an error or refusal, failed at commit)."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for ((store, op), c) in counts().lock().unwrap_or_else(|e| e.into_inner()).iter() {
        for (i, outcome) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{store=\"{store}\",operation=\"{op}\",outcome=\"{outcome}\"}} {}",
                c[i]
            );
        }
    }
}
