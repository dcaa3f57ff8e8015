//! A Jepsen-style history for HA fault tests: writers record, per id, whether the insert was
//! acknowledged (COMMIT returned), failed before COMMIT, or has an unknown outcome (the
//! connection broke or stalled during COMMIT); after the cluster heals, [`History::check`]
//! reads every member and fails on any acknowledged id missing, any id stored twice, or two
//! primaries acknowledging writes at the same time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dalp_db::ConnectOptions;

/// The table the writers append to: no unique key, so a duplicate would be visible.
pub const SETUP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS ha_history;
     CREATE TABLE IF NOT EXISTS ha_history.writes (n bigint NOT NULL, server text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    Failed,
    Unknown,
}

#[derive(Default)]
pub struct History {
    outcomes: BTreeMap<i64, Outcome>,
    /// (when, id, server address:port, writer) of every acknowledgement, in order.
    pub acks: Vec<(Instant, i64, String, &'static str)>,
    pub failures: Vec<(i64, String)>,
}

impl History {
    pub fn acked(&self) -> BTreeSet<i64> {
        self.ids(Outcome::Acked)
    }
    pub fn unknown(&self) -> BTreeSet<i64> {
        self.ids(Outcome::Unknown)
    }
    fn ids(&self, o: Outcome) -> BTreeSet<i64> {
        self.outcomes
            .iter()
            .filter(|(_, v)| **v == o)
            .map(|(k, _)| *k)
            .collect()
    }
    /// The first acknowledgement after `t`.
    pub fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.acks.iter().map(|a| a.0).find(|at| *at > t)
    }
    /// The longest time without an acknowledgement to `writer` (any writer: `None`) between
    /// `from` and `to`: the write outage a fault in that span caused for that client.
    pub fn longest_gap(&self, from: Instant, to: Instant, writer: Option<&str>) -> Duration {
        let mut times: Vec<Instant> = vec![from];
        times.extend(
            self.acks
                .iter()
                .filter(|a| writer.is_none_or(|w| a.3 == w))
                .map(|a| a.0)
                .filter(|t| *t > from && *t < to),
        );
        times.push(to);
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

/// What the check found (all empty = the history is clean).
#[derive(Debug, Default)]
pub struct Verdict {
    pub acked: usize,
    pub unknown: usize,
    pub unknown_landed: usize,
    pub failed: usize,
    /// (member, acknowledged ids it lacks)
    pub lost: Vec<(String, Vec<i64>)>,
    /// (member, ids stored more than once)
    pub duplicates: Vec<(String, Vec<i64>)>,
    /// Acknowledgements from a primary after another primary had acknowledged later writes.
    pub interleaved_primaries: Vec<String>,
}

impl Verdict {
    pub fn assert_clean(&self) {
        assert!(
            self.lost.is_empty(),
            "acknowledged writes lost: {:?}",
            self.lost
        );
        assert!(
            self.duplicates.is_empty(),
            "ids stored twice: {:?}",
            self.duplicates
        );
        assert!(
            self.interleaved_primaries.is_empty(),
            "two primaries acknowledged writes at once: {:?}",
            self.interleaved_primaries
        );
    }
}

/// A writer inserting ids from a shared counter, one connection per write (a client that
/// knows nothing of Patroni: `target_session_attrs=read-write` over the hosts it is given).
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn spawn(
        name: &'static str,
        opts: ConnectOptions,
        ids: Arc<AtomicI64>,
        history: Arc<Mutex<History>>,
        pause: Duration,
        write_timeout: Duration,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            while !flag.load(Ordering::Relaxed) {
                let n = ids.fetch_add(1, Ordering::Relaxed);
                let outcome = write_one(&opts, n, write_timeout).await;
                {
                    let mut h = history.lock().unwrap();
                    match outcome {
                        Ok((server, _)) => {
                            h.outcomes.insert(n, Outcome::Acked);
                            h.acks.push((Instant::now(), n, server, name));
                        }
                        Err((o, e)) => {
                            h.outcomes.insert(n, o);
                            if o == Outcome::Failed {
                                h.failures.push((n, e));
                            }
                        }
                    }
                }
                tokio::time::sleep(pause).await;
            }
        });
        Writer { stop, handle }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap();
    }
}

/// What a reader session saw.
#[derive(Debug, Default)]
pub struct ReadVerdict {
    /// Reads served by a replica that had replayed the session's position.
    pub replica_reads: usize,
    /// Reads skipped: no replica reached the session's position within the bound.
    pub skipped: usize,
    /// Read-your-writes or monotonic-read violations, each in a sentence.
    pub violations: Vec<String>,
}

/// A reader session: it writes its own ids (recorded in the shared history like a
/// [`Writer`]'s) and after each acknowledged write reads through a replica by dalp's replica
/// routing rule (`dalp_db::ha::Session::seen_by` over `dalp_meta.replica_state()`, so the
/// database must be migrated) — only from a replica that streams the session's timeline and
/// has replayed its position (its last commit's, and every position it has read at),
/// waiting up to `catch_up` for one. Each such read must show every write this session had acknowledged
/// (read-your-writes) and every acknowledged id an earlier read showed (monotonic reads).
pub struct Reader {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<ReadVerdict>,
}

impl Reader {
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        name: &'static str,
        primary: ConnectOptions,
        replicas: Vec<ConnectOptions>,
        ids: Arc<AtomicI64>,
        history: Arc<Mutex<History>>,
        pause: Duration,
        limit: Duration,
        catch_up: Duration,
    ) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut v = ReadVerdict::default();
            let mut own: Vec<i64> = Vec::new();
            let mut seen: Vec<i64> = Vec::new();
            let mut session = dalp_db::ha::Session::default();
            let mut turn = 0usize;
            while !flag.load(Ordering::Relaxed) {
                let n = ids.fetch_add(1, Ordering::Relaxed);
                let outcome = write_one(&primary, n, limit).await;
                let client = {
                    let mut h = history.lock().unwrap();
                    match outcome {
                        Ok((server, client)) => {
                            h.outcomes.insert(n, Outcome::Acked);
                            h.acks.push((Instant::now(), n, server, name));
                            Some(client)
                        }
                        Err((o, e)) => {
                            h.outcomes.insert(n, o);
                            if o == Outcome::Failed {
                                h.failures.push((n, e));
                            }
                            None
                        }
                    }
                };
                if let Some(c) = client {
                    own.push(n);
                    let at = tokio::time::timeout(limit, dalp_db::ha::primary_position(&c)).await;
                    if let Ok(Ok(Some(p))) = at {
                        session.saw(p);
                    }
                    if session.last_commit.is_some() {
                        let acked: Vec<i64> = history.lock().unwrap().acked().into_iter().collect();
                        turn += 1;
                        // The nodes in turn, from a different one each time: the first that
                        // is a replica at the session's position serves the read.
                        let mut served = false;
                        for k in 0..replicas.len() {
                            let replica = &replicas[(turn + k) % replicas.len()];
                            match read_at(replica, &session, catch_up, &own, &seen, &acked).await {
                                Some(Ok((replayed, visible))) => {
                                    v.replica_reads += 1;
                                    session.saw(replayed);
                                    seen = visible;
                                }
                                Some(Err(violation)) => {
                                    v.violations.push(format!("{name}: {violation}"))
                                }
                                None => continue,
                            }
                            served = true;
                            break;
                        }
                        if !served {
                            v.skipped += 1;
                        }
                    }
                }
                tokio::time::sleep(pause).await;
            }
            v
        });
        Reader { stop, handle }
    }

    pub async fn stop(self) -> ReadVerdict {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap()
    }
}

/// One read on `replica` once it has `session`'s writes by the routing rule (polled up to
/// `catch_up`): `None` when it is unreachable, not a replica, off the session's timeline or
/// does not get there in time; else its position and the acknowledged ids it shows, or the
/// violation it shows.
async fn read_at(
    replica: &ConnectOptions,
    session: &dalp_db::ha::Session,
    catch_up: Duration,
    own: &[i64],
    seen: &[i64],
    acked: &[i64],
) -> Option<Result<(dalp_db::ha::Position, Vec<i64>), String>> {
    let c = tokio::time::timeout(Duration::from_secs(2), replica.connect())
        .await
        .ok()?
        .ok()?;
    let deadline = Instant::now() + catch_up;
    let replayed = loop {
        let at = dalp_db::ha::node_position(&c).await.ok()?;
        if !at.in_recovery {
            return None;
        }
        if session.seen_by(&at) {
            break dalp_db::ha::Position {
                lsn: at.lsn?,
                timeline: at.timeline?,
            };
        }
        if session.off_timeline(&at) || Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let position = session
        .last_commit
        .map(|l| l.to_string())
        .unwrap_or_default();
    let visible: Vec<i64> = c
        .query(
            "SELECT n FROM ha_history.writes WHERE n = ANY($1)",
            &[&acked],
        )
        .await
        .ok()?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let shown: BTreeSet<i64> = visible.iter().copied().collect();
    let missing_own: Vec<i64> = own.iter().copied().filter(|n| !shown.contains(n)).collect();
    // Which replica, and where its WAL comes from: the violation's evidence.
    let whence = || async {
        let r = c
            .query_one(
                "SELECT (SELECT timeline_id FROM pg_control_checkpoint())::text, \
                 coalesce((SELECT status || ' tli ' || received_tli || ' from ' || sender_host FROM pg_stat_wal_receiver), 'no WAL receiver')",
                &[],
            )
            .await;
        let at = replica
            .hosts
            .first()
            .map(|(h, p)| format!("{h}:{p}"))
            .unwrap_or_default();
        match r {
            Ok(r) => format!(
                "{at}, checkpoint timeline {}, {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1)
            ),
            Err(e) => format!("{at} ({e})"),
        }
    };
    if !missing_own.is_empty() {
        return Some(Err(format!(
            "read-your-writes: a replica at {replayed} (≥ {position}) lacks this session's acknowledged {missing_own:?} [{}]",
            whence().await
        )));
    }
    let gone: Vec<i64> = seen
        .iter()
        .copied()
        .filter(|n| !shown.contains(n))
        .collect();
    if !gone.is_empty() {
        return Some(Err(format!(
            "monotonic reads: a replica at {replayed} no longer shows {gone:?}, which an earlier read showed [{}]",
            whence().await
        )));
    }
    Some(Ok((replayed, visible)))
}

async fn write_one(
    opts: &ConnectOptions,
    n: i64,
    limit: Duration,
) -> Result<(String, tokio_postgres::Client), (Outcome, String)> {
    let failed = |e: String| (Outcome::Failed, e);
    let client = tokio::time::timeout(limit, opts.connect())
        .await
        .map_err(|_| failed("connect timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let before = async {
        client.batch_execute("BEGIN").await?;
        let row = client
            .query_one(
                "INSERT INTO ha_history.writes (n, server) VALUES ($1, host(inet_server_addr()) || ':' || inet_server_port()) RETURNING server",
                &[&n],
            )
            .await?;
        Ok::<String, tokio_postgres::Error>(row.get(0))
    };
    let server = tokio::time::timeout(limit, before)
        .await
        .map_err(|_| failed("insert timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    // Once COMMIT is sent, anything but its answer leaves the outcome unknown.
    match tokio::time::timeout(limit, client.batch_execute("COMMIT")).await {
        Ok(Ok(())) => Ok((server, client)),
        Ok(Err(e)) if e.code().is_some() && !dalp_db::ha::is_failover_error(&e) => {
            Err(failed(e.to_string()))
        }
        Ok(Err(e)) => Err((Outcome::Unknown, e.to_string())),
        Err(_) => Err((Outcome::Unknown, "COMMIT timed out".into())),
    }
}

/// Reads every member (name, options that reach it whatever its role) until each holds every
/// acknowledged id or `within` passes (replicas replay a moment behind), and judges the history.
pub async fn check(
    history: &History,
    members: &[(String, ConnectOptions)],
    within: Duration,
) -> Verdict {
    let acked = history.acked();
    let unknown = history.unknown();
    let mut v = Verdict {
        acked: acked.len(),
        unknown: unknown.len(),
        failed: history.failures.len(),
        ..Default::default()
    };
    let mut landed = BTreeSet::new();
    for (name, opts) in members {
        let deadline = Instant::now() + within;
        let (rows, missing) = loop {
            let rows: Vec<i64> = match opts.connect().await {
                Ok(c) => match c.query("SELECT n FROM ha_history.writes", &[]).await {
                    Ok(r) => r.iter().map(|r| r.get(0)).collect(),
                    Err(_) => Vec::new(),
                },
                Err(_) => Vec::new(),
            };
            let present: BTreeSet<i64> = rows.iter().copied().collect();
            let missing: Vec<i64> = acked.difference(&present).copied().collect();
            if missing.is_empty() || Instant::now() > deadline {
                break (rows, missing);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if !missing.is_empty() {
            v.lost.push((name.clone(), missing));
        }
        let mut seen = BTreeSet::new();
        let dups: BTreeSet<i64> = rows.iter().copied().filter(|n| !seen.insert(*n)).collect();
        if !dups.is_empty() {
            v.duplicates
                .push((name.clone(), dups.into_iter().collect()));
        }
        landed.extend(rows.into_iter().filter(|n| unknown.contains(n)));
    }
    v.unknown_landed = landed.len();
    // Acknowledging primaries must form runs: once a primary acknowledged, an earlier one
    // acknowledging again means both accepted writes in the same period.
    let mut retired = BTreeSet::new();
    let mut current: Option<&str> = None;
    for (_, n, server, _) in &history.acks {
        if current != Some(server.as_str()) {
            if retired.contains(server.as_str()) {
                v.interleaved_primaries
                    .push(format!("{server} acknowledged id {n} after being replaced"));
            }
            if let Some(c) = current {
                retired.insert(c);
            }
            current = Some(server.as_str());
        }
    }
    v
}
