//! The SIEM forwarder: ships sealed events (and optionally pgAudit's AUDIT lines) with a
//! durable cursor per stream in `dalp_audit.forward_cursors` (as the sealer role).
//!
//! At-least-once, never losing an event the receiver did not demonstrably get:
//! - before every batch the connection is checked on its read side, so nothing is written
//!   into a connection the receiver already closed;
//! - a cursor moves only past what the receiver is known to hold: with RELP, what it
//!   answered `200 OK`; with syslog, what its TCP stack acknowledged while the connection
//!   then stayed open for `settle` (a receiver that stops or resets within that time may not
//!   have read it) — or what preceded a close it answered properly;
//! - after any reconnect, sending resumes from the durable cursor, so what was in flight is
//!   sent again (a duplicate carries its sequence number for the SIEM to drop).
//!
//! With the events goes the signed chain head that covers them (MSGID `chainhead`), so the
//! SIEM keeps witnessed heads outside the database, as the witness directory does.
//!
//! Cursors are written only when they move: an idle forwarder issues no writes, so pgAudit
//! logs nothing for it, and its own cursor statements are never shipped.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dalp_db::TypedClient;
use deadpool_postgres::Pool;
use tokio::sync::watch;

use super::{read_sealed, ExportError, Framer, SiemTls, SyslogSink, SyslogTarget};

/// What the forwarder reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Messages written and acknowledged by the receiver's transport.
    Sent { messages: usize },
    /// The receiver is known to hold every sealed event through this sequence number.
    Delivered { through: i64 },
    /// A problem, reported once until it changes; the forwarder keeps retrying.
    Problem { message: String, certificate: bool },
    /// The receiver is reachable again after a problem.
    Recovered,
}

pub struct Forwarder {
    pub pool: Pool,
    pub name: String,
    pub framer: Framer,
    pub target: SyslogTarget,
    pub tls: SiemTls,
    pub batch: i64,
    /// Pause after each batch, to spare a SIEM with ingest limits. Zero: none.
    pub pace: Duration,
    /// Also ship pgAudit's AUDIT entries from the JSON server logs (`*.json`) in this
    /// directory, each file with its own durable byte-offset cursor.
    pub pgaudit_dir: Option<PathBuf>,
    /// Syslog only: how long a connection must stay open after the receiver's TCP stack
    /// acknowledged a batch before the batch counts as delivered.
    pub settle: Duration,
}

/// One connection's bookkeeping.
#[derive(Default)]
struct Session {
    /// Position of each cursor (the events cursor, one per log file) sent on this connection.
    sent: HashMap<String, i64>,
    /// Sent and acknowledged by the transport, not yet known to be held.
    pending: VecDeque<(String, i64, Instant)>,
    /// The newest chain head sent on this connection.
    head_sent: i64,
}

/// A cursor's position, creating its row (at 0) only when it does not exist yet.
async fn read_or_create_cursor(
    c: &deadpool_postgres::Object,
    name: &str,
) -> Result<i64, ExportError> {
    if let Some(r) = c
        .typed_query_opt(
            "SELECT last_seq FROM dalp_audit.forward_cursors WHERE name = $1",
            &[&name],
        )
        .await?
    {
        return Ok(r.get(0));
    }
    c.typed_execute(
        "INSERT INTO dalp_audit.forward_cursors (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[&name],
    )
    .await?;
    Ok(c.typed_query_one(
        "SELECT last_seq FROM dalp_audit.forward_cursors WHERE name = $1",
        &[&name],
    )
    .await?
    .get(0))
}

/// Cursor name of one server log file: `<forwarder>-pgaudit-<file>` in cursor syntax.
fn log_cursor_name(forwarder: &str, file: &str) -> String {
    let f: String = file
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut n = format!("{forwarder}-pgaudit-{f}");
    n.truncate(63);
    n
}

/// Waits `d`, or less when a stop is requested; true when stopping.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        changed = stop.changed() => changed.is_err() || *stop.borrow(),
    }
}

impl Forwarder {
    /// The durable events cursor: every sealed event through it is known to be delivered.
    pub async fn cursor(&self) -> Result<i64, ExportError> {
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        read_or_create_cursor(&c, &self.name).await
    }

    /// Where `cursor` stands on this connection: what was sent, else the durable position.
    async fn position(
        &self,
        c: &deadpool_postgres::Object,
        session: &mut Session,
        cursor: &str,
    ) -> Result<i64, ExportError> {
        if let Some(p) = session.sent.get(cursor) {
            return Ok(*p);
        }
        let p = read_or_create_cursor(c, cursor).await?;
        session.sent.insert(cursor.to_string(), p);
        Ok(p)
    }

    /// Records as durable what the receiver is known to hold: everything pending when `all`
    /// (RELP answered, or a close the receiver answered), else what stayed acknowledged on an
    /// open connection for `settle`. Writes only cursors that move. Returns the events
    /// cursor when it moved.
    async fn confirm(&self, session: &mut Session, all: bool) -> Result<Option<i64>, ExportError> {
        let now = Instant::now();
        let mut moved: HashMap<String, i64> = HashMap::new();
        while let Some((_, _, at)) = session.pending.front() {
            if !all && *at + self.settle > now {
                break;
            }
            let (cursor, pos, _) = session.pending.pop_front().expect("front exists");
            moved.insert(cursor, pos);
        }
        if moved.is_empty() {
            return Ok(None);
        }
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let mut events = None;
        for (cursor, pos) in moved {
            if cursor == self.name {
                c.typed_execute(
                    "UPDATE dalp_audit.forward_cursors SET last_seq = $2, updated_at = now() WHERE name = $1 AND last_seq < $2",
                    &[&cursor, &pos],
                )
                .await?;
                events = Some(pos);
            } else {
                // A log file's byte offset (a file re-created under the same name starts over).
                c.typed_execute(
                    "UPDATE dalp_audit.forward_cursors SET last_seq = $2, updated_at = now() WHERE name = $1",
                    &[&cursor, &pos],
                )
                .await?;
            }
        }
        Ok(events)
    }

    /// Sends one batch of sealed events after this connection's position; returns how many.
    async fn step(
        &self,
        sink: &mut SyslogSink,
        session: &mut Session,
    ) -> Result<usize, ExportError> {
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let after = self.position(&c, session, &self.name).await?;
        let events = read_sealed(&c, after, None, self.batch).await?;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(0);
        };
        let mut messages: Vec<String> = events.iter().map(|e| self.framer.event(e)).collect();
        // The signed head covering what was sent goes along: the SIEM witnesses the chain.
        if let Some(head) = crate::Sealer::checkpoint(&c)
            .await
            .map_err(|e| ExportError::Chain(e.to_string()))?
        {
            if head.batch_no > session.head_sent && head.last_seq >= last {
                messages.push(self.framer.head(&head));
                session.head_sent = head.batch_no;
            }
        }
        sink.send(&messages).await?;
        session.sent.insert(self.name.clone(), last);
        session
            .pending
            .push_back((self.name.clone(), last, Instant::now()));
        Ok(events.len())
    }

    /// Ships new AUDIT lines of the server's JSON logs; returns how many. The forwarder's own
    /// cursor statements (pgAudit logs them as writes naming `dalp_audit.forward_cursors`)
    /// are skipped, never shipped — else each cursor write would log a line that needs
    /// another cursor write.
    async fn step_pgaudit(
        &self,
        sink: &mut SyslogSink,
        session: &mut Session,
    ) -> Result<usize, ExportError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(dir) = &self.pgaudit_dir else {
            return Ok(0);
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().map(|x| x == "json").unwrap_or(false))
            .collect();
        files.sort();
        let c = dalp_db::pool::checkout(&self.pool, "audit").await?;
        let mut sent = 0;
        for path in files {
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let cursor = log_cursor_name(&self.name, &file_name);
            let offset = self.position(&c, session, &cursor).await?;
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset as u64))?;
            let mut buf = Vec::new();
            f.take(4 << 20).read_to_end(&mut buf)?;
            // Only whole lines; a line still being written waits for the next round.
            let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..=end]);
            let messages: Vec<String> = text
                .lines()
                .filter(|l| l.contains("\"message\":\"AUDIT: "))
                .filter(|l| !l.contains("dalp_audit.forward_cursors"))
                .map(|l| self.framer.pgaudit(l))
                .collect();
            let next = offset + end as i64 + 1;
            if !messages.is_empty() {
                sink.send(&messages).await?;
                sent += messages.len();
                // Only shipped lines make the offset worth recording; skipped bytes are
                // simply read again after a restart.
                session
                    .pending
                    .push_back((cursor.clone(), next, Instant::now()));
            }
            session.sent.insert(cursor, next);
        }
        Ok(sent)
    }

    /// One connection, until it fails (`Err`) or a stop is requested (`Ok`).
    async fn session(
        &self,
        sink: &mut SyslogSink,
        session: &mut Session,
        stop: &mut watch::Receiver<bool>,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(), ExportError> {
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            sink.check_open().await?;
            if let Some(through) = self.confirm(session, sink.acknowledges()).await? {
                progress(Progress::Delivered { through });
            }
            let sent = self.step_pgaudit(sink, session).await? + self.step(sink, session).await?;
            if sent > 0 {
                progress(Progress::Sent { messages: sent });
                if sink.acknowledges() {
                    if let Some(through) = self.confirm(session, true).await? {
                        progress(Progress::Delivered { through });
                    }
                }
            }
            let wait = if sent == 0 {
                Duration::from_millis(250)
            } else {
                self.pace
            };
            if !wait.is_zero() && pause(wait, stop).await {
                return Ok(());
            }
        }
    }

    /// Runs until `stop` turns true (or its sender is dropped), then closes the connection
    /// properly (close_notify) and records what the receiver confirmed. Reconnects with
    /// backoff on any failure, each distinct problem reported once. Returns an error only for
    /// a configuration that cannot work (e.g. an unreadable CA bundle).
    pub async fn run(
        &self,
        mut stop: watch::Receiver<bool>,
        mut progress: impl FnMut(Progress),
    ) -> Result<(), ExportError> {
        let mut backoff = Duration::from_millis(200);
        let mut problem: Option<String> = None;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let mut sink = match SyslogSink::connect(&self.target, &self.tls).await {
                Ok(s) => s,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    report(&mut problem, &e, &mut progress);
                    if pause(backoff, &mut stop).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            if problem.take().is_some() {
                progress(Progress::Recovered);
            }
            let mut session = Session::default();
            match self
                .session(&mut sink, &mut session, &mut stop, &mut progress)
                .await
            {
                Ok(()) => {
                    let held = sink.close().await;
                    if let Some(through) = self.confirm(&mut session, held).await? {
                        progress(Progress::Delivered { through });
                    }
                    return Ok(());
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    // What was pending is not known to be held: the next connection resends
                    // from the durable cursors.
                    report(&mut problem, &e, &mut progress);
                    if pause(backoff, &mut stop).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Reports `e` unless it is the problem reported last.
fn report(problem: &mut Option<String>, e: &ExportError, progress: &mut impl FnMut(Progress)) {
    let message = e.to_string();
    if problem.as_deref() != Some(message.as_str()) {
        progress(Progress::Problem {
            message: message.clone(),
            certificate: matches!(e, ExportError::Certificate(_)),
        });
        *problem = Some(message);
    }
}
