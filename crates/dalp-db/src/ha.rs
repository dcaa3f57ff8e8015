//! Failover-aware execution and replica routing for a replicated deployment.
//!
//! * **Writes** go to the primary through a pool whose connections list every host with
//!   `target_session_attrs=read-write`, so a new connection finds whichever node is primary
//!   now. A write runs as one transaction; on a lost connection, a server shutting down or a
//!   `read only transaction` error (the node was demoted) *before* COMMIT, the connection is
//!   discarded and the whole transaction is retried with backoff until a deadline. An error
//!   *during* COMMIT is [`ExecError::CommitUnknown`]: the write may or may not have landed,
//!   and the caller decides (the domain's idempotency keys make a retry safe). It is never
//!   retried silently as if it had failed.
//! * **Reads** marked replica-safe go to a replica that is up and within the lag bound. With
//!   **read-your-writes**, a [`Session`] carries the WAL position of its last commit and the
//!   replica must have replayed it within [`RouterOptions::ryw_timeout`]; otherwise the read
//!   falls back to the primary.
//! * A probe measures each replica's replay lag (bytes behind the primary) every
//!   [`RouterOptions::probe_interval`]; unreachable or lagging replicas are skipped until
//!   a probe finds them healthy again.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use tokio_postgres::error::SqlState;

use crate::connect::ConnectOptions;
use crate::pool::PoolError;

/// A WAL position (`pg_lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not an LSN (X/Y)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("`{s}` is not an LSN"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("`{s}` is not an LSN"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("`{s}` is not an LSN"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// What one logical client has written: reads through [`Router::read`] see at least this.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub last_commit: Option<Lsn>,
    /// The primary's timeline at `last_commit` (none: any timeline a streaming replica
    /// follows). WAL positions compare only on one history, so a replica serves the session
    /// only while it streams this timeline or a later one.
    pub timeline: Option<u32>,
}

impl Session {
    /// Records a commit at `position` (the later of it and what the session had).
    pub fn saw(&mut self, position: Position) {
        self.last_commit = Some(
            self.last_commit
                .map_or(position.lsn, |l| l.max(position.lsn)),
        );
        self.timeline = Some(
            self.timeline
                .map_or(position.timeline, |t| t.max(position.timeline)),
        );
    }

    /// Whether a node at `at` cannot show this session's writes by replaying further: it
    /// does not stream (a position off a streaming receiver, or off a primary's own
    /// timeline, proves nothing), or it streams an earlier timeline than the session's.
    pub fn off_timeline(&self, at: &NodePosition) -> bool {
        at.timeline
            .is_none_or(|t| self.timeline.is_some_and(|s| t < s))
    }

    /// Whether a node whose data stands at `at` has everything this session wrote.
    pub fn seen_by(&self, at: &NodePosition) -> bool {
        if self.off_timeline(at) {
            return false;
        }
        match (self.last_commit, at.lsn) {
            (None, _) => true,
            (Some(target), Some(lsn)) => lsn >= target,
            (Some(_), None) => false,
        }
    }
}

/// A primary's WAL position and timeline: a read-your-writes token (`X/Y@T` as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub lsn: Lsn,
    pub timeline: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.lsn, self.timeline)
    }
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Position, String> {
        let (lsn, timeline) = s
            .split_once('@')
            .ok_or_else(|| format!("`{s}` is not a position (X/Y@timeline)"))?;
        let timeline = timeline
            .parse::<u32>()
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| format!("`{s}` has no timeline after `@`"))?;
        Ok(Position {
            lsn: lsn.parse()?,
            timeline,
        })
    }
}

/// Where one node's data stands (`dalp_meta.replica_state()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePosition {
    pub in_recovery: bool,
    /// Replayed (replica) or current (primary) WAL position.
    pub lsn: Option<Lsn>,
    /// The timeline a replica streams (none while its WAL receiver does not stream) or a
    /// primary writes.
    pub timeline: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The statement failed for a reason a retry would not fix (constraint, bad input, …).
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    /// The connection was lost during COMMIT: the transaction may or may not be durable.
    #[error("the outcome of the commit is unknown (connection lost during COMMIT: {0}); check, or retry with the same idempotency key")]
    CommitUnknown(String),
    /// No primary (or replica) could run the operation before the deadline.
    #[error("the database is unavailable after {attempts} attempts over {waited:?}: {last}")]
    Unavailable {
        attempts: u32,
        waited: Duration,
        last: String,
    },
}

/// Whether an error means "this connection/server cannot serve us now; another may".
pub fn is_failover_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return [
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_DOES_NOT_EXIST,
            SqlState::CONNECTION_FAILURE,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code);
    }
    // No server error: an I/O failure of the socket (reset, EOF, TLS).
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Tunables of the router.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Connections per pool (primary and each replica).
    pub pool_size: usize,
    /// Give up retrying a write (or a read on the primary) after this long.
    pub retry_deadline: Duration,
    /// First backoff between retries; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a read-your-writes read waits for a replica to replay the session's commit.
    pub ryw_timeout: Duration,
    /// Replicas further behind than this (bytes of WAL) are skipped.
    pub max_lag_bytes: u64,
    pub probe_interval: Duration,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            pool_size: 8,
            retry_deadline: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            ryw_timeout: Duration::from_millis(250),
            max_lag_bytes: 16 << 20,
            probe_interval: Duration::from_millis(500),
        }
    }
}

/// Where a read was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    Replica(String),
    Primary,
}

/// A replica's health as the probe last saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaHealth {
    pub name: String,
    pub up: bool,
    pub lag_bytes: Option<u64>,
    pub in_recovery: bool,
    /// Its WAL receiver streams from the primary; reads use only replicas that stream.
    pub streaming: bool,
    pub checked_ms_ago: u64,
}

struct Replica {
    name: String,
    pool: Pool,
    health: Mutex<Health>,
}

#[derive(Clone)]
struct Health {
    up: bool,
    lag_bytes: Option<u64>,
    in_recovery: bool,
    /// Its WAL receiver streams (a replica that does not may replay a timeline the
    /// cluster has left).
    streaming: bool,
    checked: Instant,
}

struct Inner {
    primary: Pool,
    replicas: Vec<Replica>,
    opts: RouterOptions,
    next: AtomicUsize,
}

/// Routes transactions to the primary and replica-safe reads to replicas.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
    _probe: Arc<ProbeTask>,
}

struct ProbeTask(tokio::task::JoinHandle<()>);
impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn build_pool(opts: &ConnectOptions, size: usize, wait: Duration) -> Result<Pool, PoolError> {
    let manager = opts.manager(RecyclingMethod::Fast)?;
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(wait))
        .create_timeout(Some(opts.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| PoolError::Build {
            role: opts.user.clone(),
            message: e.to_string(),
        })
}

/// Where the node's data stands (one round trip; the function is dalp_meta's, made by the
/// migrations, and every login role may run it).
pub async fn node_position(
    client: &tokio_postgres::Client,
) -> Result<NodePosition, tokio_postgres::Error> {
    let row = client
        .query_typed(
            "SELECT in_recovery, wal_position::text, timeline FROM dalp_meta.replica_state()",
            &[],
        )
        .await?;
    Ok(NodePosition {
        in_recovery: row[0].get(0),
        lsn: row[0]
            .get::<_, Option<String>>(1)
            .and_then(|s| s.parse().ok()),
        timeline: row[0]
            .get::<_, Option<i32>>(2)
            .and_then(|t| u32::try_from(t).ok()),
    })
}

/// The primary's current WAL position and timeline (the timeline is the first eight hex
/// digits of the WAL file name; both functions are open to every role).
pub async fn primary_position(
    client: &tokio_postgres::Client,
) -> Result<Option<Position>, tokio_postgres::Error> {
    let row = client
        .query_typed(
            "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())",
            &[],
        )
        .await?;
    let lsn = row.first().and_then(|r| r.get::<_, String>(0).parse().ok());
    let timeline = row.first().and_then(|r| {
        let name: String = r.get(1);
        name.get(..8).and_then(|h| u32::from_str_radix(h, 16).ok())
    });
    Ok(lsn
        .zip(timeline)
        .map(|(lsn, timeline)| Position { lsn, timeline }))
}

impl Router {
    /// `primary` lists every host (it is made `read-write`); each of `replicas` names one
    /// host. Must be called inside a Tokio runtime (it starts the lag probe).
    pub fn new(
        primary: &ConnectOptions,
        replicas: &[ConnectOptions],
        opts: RouterOptions,
    ) -> Result<Router, PoolError> {
        let mut p = primary.clone();
        p.read_write = true;
        let primary = build_pool(&p, opts.pool_size, opts.retry_deadline)?;
        let mut rs = Vec::new();
        for r in replicas {
            let name = r
                .hosts
                .iter()
                .map(|(h, port)| format!("{h}:{port}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut o = r.clone();
            o.read_write = false;
            rs.push(Replica {
                name,
                pool: build_pool(&o, opts.pool_size, Duration::from_secs(1))?,
                health: Mutex::new(Health {
                    up: true,
                    lag_bytes: None,
                    in_recovery: true,
                    streaming: true,
                    checked: Instant::now(),
                }),
            });
        }
        let inner = Arc::new(Inner {
            primary,
            replicas: rs,
            opts,
            next: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let handle = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let interval = inner.opts.probe_interval;
                inner.probe().await;
                drop(inner);
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Router {
            inner,
            _probe: Arc::new(ProbeTask(handle)),
        })
    }

    /// The primary pool (for code that manages its own transactions).
    pub fn primary(&self) -> &Pool {
        &self.inner.primary
    }

    /// Each replica's health as last probed.
    pub fn replica_health(&self) -> Vec<ReplicaHealth> {
        self.inner
            .replicas
            .iter()
            .map(|r| {
                let h = r.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
                ReplicaHealth {
                    name: r.name.clone(),
                    up: h.up,
                    lag_bytes: h.lag_bytes,
                    in_recovery: h.in_recovery,
                    streaming: h.streaming,
                    checked_ms_ago: h.checked.elapsed().as_millis() as u64,
                }
            })
            .collect()
    }

    /// Measures every replica's lag now (the background probe does this periodically).
    pub async fn probe(&self) {
        self.inner.probe().await
    }

    /// Runs `f` in a transaction on the primary, retrying on failover errors before COMMIT
    /// (see the module docs), and records the commit position in `session`.
    pub async fn write<T, F>(&self, session: &mut Session, mut f: F) -> Result<T, ExecError>
    where
        F: for<'a> FnMut(
            &'a tokio_postgres::Transaction<'a>,
        ) -> BoxFuture<'a, Result<T, tokio_postgres::Error>>,
    {
        let mut retry = Retry::new(&self.inner.opts);
        loop {
            let mut client = match self.inner.primary.get().await {
                Ok(c) => c,
                Err(e) => {
                    retry.failed(e.to_string()).await?;
                    continue;
                }
            };
            let step = async {
                let tx = match client.transaction().await {
                    Ok(tx) => tx,
                    Err(e) => return Step::before_commit(e),
                };
                let value = match f(&tx).await {
                    Ok(v) => v,
                    Err(e) => return Step::before_commit(e),
                };
                match tx.commit().await {
                    Ok(()) => Step::Done(value),
                    Err(e) if is_failover_error(&e) => Step::Unknown(e.to_string()),
                    Err(e) => Step::Fatal(e),
                }
            }
            .await;
            let value = match step {
                Step::Done(v) => v,
                Step::Retry(e) => {
                    drop(Object::take(client));
                    retry.failed(e).await?;
                    continue;
                }
                Step::Unknown(e) => {
                    drop(Object::take(client));
                    return Err(ExecError::CommitUnknown(e));
                }
                Step::Fatal(e) => return Err(e.into()),
            };
            // The commit is durable; its position is only a hint for later reads.
            match primary_position(&client).await {
                Ok(Some(position)) => session.saw(position),
                _ => drop(Object::take(client)),
            }
            return Ok(value);
        }
    }

    /// The pool a replica-safe read of `session` should use: a healthy replica that has
    /// replayed the session's last commit (waiting up to the read-your-writes bound), else
    /// the primary. For stores that check out connections themselves.
    pub async fn read_pool(&self, session: &Session) -> (Pool, Served) {
        for r in self.inner.rotation() {
            match self.inner.candidate(r, session).await {
                Candidate::Ready(_) => return (r.pool.clone(), Served::Replica(r.name.clone())),
                Candidate::Skip => continue,
                Candidate::Primary => break,
            }
        }
        (self.inner.primary.clone(), Served::Primary)
    }

    /// The primary's current WAL position and timeline: every transaction committed before
    /// this call is at or before it (a consistency token for read-your-writes).
    pub async fn primary_position(&self) -> Result<Position, ExecError> {
        let client = self
            .inner
            .primary
            .get()
            .await
            .map_err(|e| ExecError::Unavailable {
                attempts: 1,
                waited: Duration::ZERO,
                last: e.to_string(),
            })?;
        primary_position(&client)
            .await?
            .ok_or_else(|| ExecError::Unavailable {
                attempts: 1,
                waited: Duration::ZERO,
                last: "no WAL position".into(),
            })
    }

    /// Runs the replica-safe read `f` on a healthy replica that has replayed the session's
    /// last commit, else on the primary.
    pub async fn read<T, F>(&self, session: &Session, mut f: F) -> Result<(T, Served), ExecError>
    where
        F: for<'a> FnMut(
            &'a tokio_postgres::Client,
        ) -> BoxFuture<'a, Result<T, tokio_postgres::Error>>,
    {
        for r in self.inner.rotation() {
            let client = match self.inner.candidate(r, session).await {
                Candidate::Ready(Some(c)) => *c,
                Candidate::Ready(None) => match r.pool.get().await {
                    Ok(c) => c,
                    Err(e) => {
                        r.mark_down(&e.to_string());
                        continue;
                    }
                },
                Candidate::Skip => continue,
                Candidate::Primary => break,
            };
            match f(&client).await {
                Ok(v) => return Ok((v, Served::Replica(r.name.clone()))),
                Err(e) if is_failover_error(&e) => {
                    drop(Object::take(client));
                    r.mark_down(&e.to_string());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut retry = Retry::new(&self.inner.opts);
        loop {
            let client = match self.inner.primary.get().await {
                Ok(c) => c,
                Err(e) => {
                    retry.failed(e.to_string()).await?;
                    continue;
                }
            };
            match f(&client).await {
                Ok(v) => return Ok((v, Served::Primary)),
                Err(e) if is_failover_error(&e) => {
                    drop(Object::take(client));
                    retry.failed(e.to_string()).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Replica reads for the components whose reads may come from a replica (asset
/// configuration and indexed chain state): one [`Router`] each over the component's own role,
/// the primary from its pool options and every replica host beside it.
pub struct ReadReplicas {
    routers: std::collections::BTreeMap<crate::Component, Router>,
}

impl ReadReplicas {
    /// The components read through replicas.
    pub const COMPONENTS: [crate::Component; 2] =
        [crate::Component::Assets, crate::Component::Indexer];

    /// Routers over `replicas` (`host`, `port`) for [`ReadReplicas::COMPONENTS`]. Must be
    /// called inside a Tokio runtime.
    pub fn new(
        pools: &crate::ComponentPools,
        replicas: &[(String, u16)],
        opts: RouterOptions,
    ) -> Result<ReadReplicas, PoolError> {
        let mut routers = std::collections::BTreeMap::new();
        for c in Self::COMPONENTS {
            let primary = pools.options(c).clone();
            let hosts: Vec<ConnectOptions> = replicas
                .iter()
                .map(|h| {
                    let mut o = primary.clone();
                    o.hosts = vec![h.clone()];
                    o
                })
                .collect();
            routers.insert(c, Router::new(&primary, &hosts, opts.clone())?);
        }
        Ok(ReadReplicas { routers })
    }

    pub fn router(&self, c: crate::Component) -> Option<&Router> {
        self.routers.get(&c)
    }

    /// Any of the routers (they share the primary): for the primary's WAL position.
    pub fn any(&self) -> &Router {
        self.routers
            .values()
            .next()
            .expect("at least one component")
    }
}

/// What a replica can do for one read.
enum Candidate {
    /// Serve it (with the client used to check it, if one was).
    Ready(Option<Box<Object>>),
    /// Not now: try the next replica.
    Skip,
    /// A replica that has not caught up: the primary reads it.
    Primary,
}

/// Whether a replica has a session's writes.
enum CatchUp {
    Ready,
    /// On the session's timeline but not at its position within the bound.
    Behind,
    /// Not streaming, or streaming an earlier timeline.
    OffTimeline,
}

/// How one attempt of a write ended.
enum Step<T> {
    Done(T),
    /// Failed before COMMIT on a failover error: nothing was written; try again.
    Retry(String),
    /// Lost during COMMIT.
    Unknown(String),
    Fatal(tokio_postgres::Error),
}

impl<T> Step<T> {
    fn before_commit(e: tokio_postgres::Error) -> Step<T> {
        if is_failover_error(&e) {
            Step::Retry(e.to_string())
        } else {
            Step::Fatal(e)
        }
    }
}

impl Replica {
    fn mark_down(&self, why: &str) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.up {
            tracing::warn!(replica = %self.name, error = %why, "replica unavailable; reads skip it until it recovers");
        }
        h.up = false;
        h.checked = Instant::now();
    }
}

impl Inner {
    /// The replicas, starting at the next one in turn.
    fn rotation(&self) -> impl Iterator<Item = &Replica> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(move |i| &self.replicas[(start + i) % n])
    }

    /// Whether `r` may serve a read of `session` now. With a commit to see, it checks out a
    /// client to ask the replica (handed back with `Ready`); without, it asks nothing.
    async fn candidate(&self, r: &Replica, session: &Session) -> Candidate {
        if !self.eligible(r) {
            return Candidate::Skip;
        }
        if session.last_commit.is_none() {
            return Candidate::Ready(None);
        }
        let client = match r.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                r.mark_down(&e.to_string());
                return Candidate::Skip;
            }
        };
        match self.caught_up(&client, session).await {
            Ok(CatchUp::Ready) => Candidate::Ready(Some(Box::new(client))),
            // Not there in time: the primary has it.
            Ok(CatchUp::Behind) => Candidate::Primary,
            // Not streaming the session's timeline (restarted, diverged, or following a
            // deposed primary): its position proves nothing; another replica may serve.
            Ok(CatchUp::OffTimeline) => Candidate::Skip,
            Err(e) => {
                drop(Object::take(client));
                r.mark_down(&e.to_string());
                Candidate::Skip
            }
        }
    }

    fn eligible(&self, r: &Replica) -> bool {
        let h = r.health.lock().unwrap_or_else(|e| e.into_inner());
        // A listed node that is the primary now (after a failover) is read as the primary.
        h.up && h.in_recovery
            && h.streaming
            && h.lag_bytes.is_none_or(|l| l <= self.opts.max_lag_bytes)
    }

    /// Polls the replica's position until it has the session's writes or the RYW bound
    /// ends.
    async fn caught_up(
        &self,
        client: &tokio_postgres::Client,
        session: &Session,
    ) -> Result<CatchUp, tokio_postgres::Error> {
        let deadline = Instant::now() + self.opts.ryw_timeout;
        let mut pause = Duration::from_micros(500);
        loop {
            let at = node_position(client).await?;
            if session.seen_by(&at) {
                return Ok(CatchUp::Ready);
            }
            if session.off_timeline(&at) {
                return Ok(CatchUp::OffTimeline);
            }
            if Instant::now() + pause > deadline {
                return Ok(CatchUp::Behind);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    async fn probe(&self) {
        if self.replicas.is_empty() {
            return;
        }
        let primary_lsn =
            match tokio::time::timeout(Duration::from_secs(2), self.primary.get()).await {
                Ok(Ok(c)) => primary_position(&c).await.ok().flatten().map(|p| p.lsn),
                _ => None,
            };
        for r in &self.replicas {
            let seen = async {
                let c = r.pool.get().await.map_err(|e| e.to_string())?;
                let state = node_position(&c).await.map_err(|e| {
                    if is_failover_error(&e) {
                        drop(Object::take(c));
                    }
                    e.to_string()
                })?;
                Ok::<_, String>(state)
            };
            match tokio::time::timeout(Duration::from_secs(2), seen).await {
                Ok(Ok(at)) => {
                    let lag = match (at.in_recovery, primary_lsn, at.lsn) {
                        (false, _, _) => Some(0),
                        (true, Some(p), Some(r)) => Some(p.0.saturating_sub(r.0)),
                        _ => None,
                    };
                    let streaming = at.timeline.is_some();
                    let mut h = r.health.lock().unwrap_or_else(|e| e.into_inner());
                    if at.in_recovery && !streaming && h.streaming {
                        tracing::warn!(replica = %r.name, "replica's WAL receiver does not stream; reads skip it until it does");
                    } else if !h.up || (streaming && !h.streaming) {
                        tracing::info!(replica = %r.name, "replica is back; reads use it again");
                    }
                    *h = Health {
                        up: true,
                        lag_bytes: lag,
                        in_recovery: at.in_recovery,
                        streaming,
                        checked: Instant::now(),
                    };
                }
                Ok(Err(e)) => r.mark_down(&e),
                Err(_) => r.mark_down("probe timed out"),
            }
        }
    }
}

/// Backoff with jitter until the deadline.
struct Retry {
    started: Instant,
    attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    deadline: Duration,
}

impl Retry {
    fn new(opts: &RouterOptions) -> Retry {
        Retry {
            started: Instant::now(),
            attempts: 0,
            backoff: opts.initial_backoff,
            max_backoff: opts.max_backoff,
            deadline: opts.retry_deadline,
        }
    }

    async fn failed(&mut self, last: String) -> Result<(), ExecError> {
        self.attempts += 1;
        let waited = self.started.elapsed();
        if waited >= self.deadline {
            return Err(ExecError::Unavailable {
                attempts: self.attempts,
                waited,
                last,
            });
        }
        tracing::debug!(attempt = self.attempts, error = %last, "retrying after a failover error");
        // Up to 25 % jitter so many clients do not retry in lockstep.
        let nanos = self.backoff.as_nanos() as u64;
        let random = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        let jitter = random % (nanos / 4 + 1);
        tokio::time::sleep(Duration::from_nanos(nanos + jitter)).await;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_and_orders() {
        let a: Lsn = "0/16B3748".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "0/16B3748");
        assert_eq!(b.0, 1 << 32);
        assert!("16B3748".parse::<Lsn>().is_err());
        assert!("0/XYZ".parse::<Lsn>().is_err());
        assert!("100000000/0".parse::<Lsn>().is_err());
    }

    #[test]
    fn positions_parse_and_print_with_their_timeline() {
        let p: Position = "0/6031D20@2".parse().unwrap();
        assert_eq!(p.timeline, 2);
        assert_eq!(p.to_string(), "0/6031D20@2");
        for bad in [
            "0/6031D20",
            "0/6031D20@",
            "0/6031D20@0",
            "0/6031D20@x",
            "@2",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }

    fn node(lsn: &str, timeline: Option<u32>) -> NodePosition {
        NodePosition {
            in_recovery: true,
            lsn: Some(lsn.parse().unwrap()),
            timeline,
        }
    }

    #[test]
    fn a_session_is_seen_only_on_its_timeline_or_a_later_one() {
        let mut s = Session::default();
        s.saw("0/6031D20@2".parse().unwrap());
        // An earlier position on the same timeline can come back later: the latest counts.
        s.saw("0/5000000@2".parse().unwrap());
        assert_eq!(s.last_commit, Some("0/6031D20".parse().unwrap()));
        // The double failure's stale replica: past the position but not streaming.
        assert!(!s.seen_by(&node("0/7000000", None)));
        // Streaming the timeline the cluster left (a deposed primary's).
        assert!(!s.seen_by(&node("0/7000000", Some(1))));
        assert!(!s.seen_by(&node("0/6000000", Some(2))));
        assert!(s.seen_by(&node("0/6031D20", Some(2))));
        assert!(s.seen_by(&node("0/6031D20", Some(3))));
        // A bare X/Y token: any streaming timeline.
        let bare = Session {
            last_commit: Some("0/6031D20".parse().unwrap()),
            timeline: None,
        };
        assert!(bare.seen_by(&node("0/7000000", Some(1))));
        assert!(!bare.seen_by(&node("0/7000000", None)));
        // Nothing written: any streaming replica.
        assert!(Session::default().seen_by(&node("0/1", Some(1))));
        assert!(!Session::default().seen_by(&node("0/1", None)));
    }
}
