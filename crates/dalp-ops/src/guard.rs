//! The node guard: a small process beside each node's Patroni (`dalp node guard`, started by
//! `dalp node up` and `dalp cluster up`) that fences the node's PostgreSQL — SIGKILL to the
//! postmaster and its children — in the two cases Patroni cannot see or cannot act on:
//!
//! - **The postmaster takes no new connection** (frozen, e.g. SIGSTOP): the backends and
//!   Patroni's own connection keep working, so Patroni sees a healthy node while every new
//!   client waits. The guard probes the postmaster's socket (an `SSLRequest`, which any live
//!   postmaster answers with one byte before authentication); when no probe has been answered
//!   for `no_connection`, it fences, and Patroni restarts PostgreSQL (crash recovery; as the
//!   leader it keeps the key, so writes resume on the same node within a loop or two).
//! - **Patroni stopped answering while this node is the primary** (a frozen or dead Patroni:
//!   the zombie). Its leader key expires after ttl and a replica is promoted, while this
//!   primary would keep serving. A kernel watchdog would reset the host at `ttl − 5 s`
//!   (Patroni's safety margin); the guard fences PostgreSQL at the same point, before the key
//!   can expire, so there are never two primaries. It also fences when Patroni answers but
//!   says its loop has not run for a ttl (`/liveness` 503). Paused clusters (`/liveness` 200)
//!   are left alone.
//!
//! It also supervises Patroni: when Patroni's process has exited (crashed, OOM-killed,
//! killed), the guard starts it again ([`Restarts`]: at once, then with a backoff while it
//! keeps dying), so a node whose host stays up heals without `dalp node up`. `dalp node down`
//! stops the guard first, so a deliberate stop is never undone.
//!
//! A user-space guard is no substitute for a watchdog against a frozen host (it freezes too);
//! dalp's synchronous replication keeps that case from acknowledging lost writes
//! (docs/architecture.md). Each fence and restart is logged and appended to
//! `<node>/guard.events`.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long the guard tolerates each symptom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// How often Patroni and the role are checked.
    pub tick: Duration,
    /// How often the postmaster is probed while it answers (each probe is one "connection
    /// received" line in PostgreSQL's log); after an unanswered probe, every tick.
    pub probe_every: Duration,
    /// How long one probe waits for the postmaster's answer.
    pub probe_timeout: Duration,
    /// Fence after the postmaster has answered no probe for this long.
    pub no_connection: Duration,
    /// Fence a primary whose Patroni has not answered for this long.
    pub patroni_silent: Duration,
}

impl GuardLimits {
    /// Limits for a cluster with leader-key `ttl` and Patroni's `loop_wait`. Patroni's
    /// silence is tolerated for `ttl − loop_wait − 5 s` (at least half the ttl): its key was
    /// last renewed up to a loop before its last answer, and Patroni's own watchdog margin
    /// is 5 s, so the fence lands before the key can expire. A postmaster may answer
    /// nothing for a quarter of the ttl (at least 3 s).
    pub fn for_ttl(ttl: Duration, loop_wait: Duration) -> GuardLimits {
        GuardLimits {
            tick: Duration::from_secs(1),
            probe_every: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
            no_connection: (ttl / 4).max(Duration::from_secs(3)),
            patroni_silent: ttl
                .saturating_sub(loop_wait + Duration::from_secs(5))
                .max(ttl / 2),
        }
    }
}

/// What a probe of the postmaster's socket saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The postmaster answered (it accepts and forks).
    Answered,
    /// Connected (or waiting to), but no answer within the probe's timeout.
    NoAnswer,
    /// Nothing listens (starting, stopping): not a freeze.
    Closed,
}

/// What Patroni's `GET /liveness` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatroniProbe {
    /// 200: the HA loop runs (or the cluster is paused).
    Live,
    /// 503: Patroni answers, but its HA loop has not run for a ttl.
    LoopStalled,
    /// No answer within the timeout.
    Silent,
}

/// The guard's judgement, fed one observation per tick; pure, so the rules are tested
/// without processes.
#[derive(Debug)]
pub struct Judge {
    limits: GuardLimits,
    no_answer_since: Option<Instant>,
    patroni_ok_at: Instant,
    primary: bool,
}

impl Judge {
    pub fn new(limits: GuardLimits, now: Instant) -> Judge {
        Judge {
            limits,
            no_answer_since: None,
            patroni_ok_at: now,
            primary: false,
        }
    }

    /// Whether the postmaster should be probed now (periodically; every tick while a probe
    /// went unanswered).
    pub fn probe_due(&self, last_probe: Option<Instant>, now: Instant) -> bool {
        self.no_answer_since.is_some()
            || last_probe.is_none_or(|t| now.duration_since(t) >= self.limits.probe_every)
    }

    /// One tick: `postmaster` whether one runs; `probe` when the postmaster was probed;
    /// `primary` when the node's role was read. Returns why to fence, if it must.
    pub fn observe(
        &mut self,
        now: Instant,
        postmaster: bool,
        probe: Option<Probe>,
        patroni: PatroniProbe,
        primary: Option<bool>,
    ) -> Option<String> {
        if let Some(p) = primary {
            self.primary = p;
        }
        if patroni == PatroniProbe::Live {
            self.patroni_ok_at = now;
        }
        if !postmaster {
            // Nothing to fence; Patroni starts PostgreSQL again (or is itself stopped).
            self.no_answer_since = None;
            self.primary = false;
            return None;
        }
        match probe {
            Some(Probe::NoAnswer) => {
                let since = *self.no_answer_since.get_or_insert(now);
                let silent = now.duration_since(since) + self.limits.probe_timeout;
                if silent >= self.limits.no_connection {
                    return Some(format!(
                        "the postmaster has answered no new connection for {:.1} s (frozen); Patroni restarts PostgreSQL",
                        silent.as_secs_f64()
                    ));
                }
            }
            Some(Probe::Answered | Probe::Closed) => self.no_answer_since = None,
            None => {}
        }
        if !self.primary {
            return None;
        }
        match patroni {
            PatroniProbe::LoopStalled => Some(
                "this node is the primary and Patroni's HA loop has not run for a ttl (/liveness 503): its leader key may have expired".into(),
            ),
            PatroniProbe::Silent
                if now.duration_since(self.patroni_ok_at) >= self.limits.patroni_silent =>
            {
                Some(format!(
                    "this node is the primary and Patroni has not answered for {:.1} s (frozen or dead): its leader key expires within seconds and a replica takes over",
                    now.duration_since(self.patroni_ok_at).as_secs_f64()
                ))
            }
            _ => None,
        }
    }

    /// After a fence: start judging afresh.
    pub fn fenced(&mut self, now: Instant) {
        self.no_answer_since = None;
        self.patroni_ok_at = now;
        self.primary = false;
    }
}

/// When the guard starts a Patroni that is not running: at once the first time, then no
/// sooner than a backoff (doubling from `MIN_BACKOFF` to `MAX_BACKOFF`) while it keeps
/// dying; a Patroni that has run for `MAX_BACKOFF` resets the backoff. Pure, like [`Judge`].
#[derive(Debug)]
pub struct Restarts {
    backoff: Duration,
    next: Option<Instant>,
    up_since: Option<Instant>,
}

impl Restarts {
    pub const MIN_BACKOFF: Duration = Duration::from_secs(5);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

    pub fn new() -> Restarts {
        Restarts {
            backoff: Self::MIN_BACKOFF,
            next: None,
            up_since: None,
        }
    }

    /// One tick: whether to start Patroni now, given whether it runs.
    pub fn due(&mut self, running: bool, now: Instant) -> bool {
        if running {
            let since = *self.up_since.get_or_insert(now);
            if now.duration_since(since) >= Self::MAX_BACKOFF {
                self.backoff = Self::MIN_BACKOFF;
            }
            return false;
        }
        self.up_since = None;
        if self.next.is_some_and(|n| now < n) {
            return false;
        }
        self.next = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
        true
    }
}

impl Default for Restarts {
    fn default() -> Self {
        Restarts::new()
    }
}

/// Probes the postmaster listening on `socket` (a Unix socket): sends an `SSLRequest`, which
/// a live postmaster's forked child answers with one byte (`N` on a Unix socket) before any
/// authentication; the connection then closes without a session. Never blocks past
/// `timeout`: a frozen postmaster's full backlog makes the connect itself wait.
pub async fn probe_postmaster(socket: &Path, timeout: Duration) -> Probe {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => s,
            // The backlog is full: nobody accepts.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Probe::NoAnswer,
            Err(_) => return Probe::Closed,
        };
        // Length 8, then the SSLRequest code 1234/5679.
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
        if s.write_all(&request).await.is_err() {
            return Probe::Closed;
        }
        let mut answer = [0u8; 1];
        match s.read(&mut answer).await {
            Ok(1) => Probe::Answered,
            // Closed without a byte: the postmaster refused the connection (shutting down).
            _ => Probe::Closed,
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Probe::NoAnswer)
}

/// The protocol's SSLRequest code (1234 << 16 | 5679).
const SSL_REQUEST: i32 = 80_877_103;

/// SIGKILL to the postmaster `pid` and every process whose parent it is (its backends,
/// which would otherwise run on until they notice the postmaster's death). Returns how many
/// processes were signalled.
pub fn fence_postmaster(pid: i32) -> usize {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut children = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // pid (comm) state ppid …: comm may hold spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(pid) {
                children.push(child);
            }
        }
    }
    let mut n = 0;
    for p in std::iter::once(pid).chain(children) {
        if kill(Pid::from_raw(p), Signal::SIGKILL).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> GuardLimits {
        GuardLimits::for_ttl(Duration::from_secs(20), Duration::from_secs(2))
    }

    #[test]
    fn a_dead_patroni_is_restarted_at_once_then_with_a_backoff_that_resets() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut r = Restarts::new();
        assert!(!r.due(true, t0));
        // Dies: started at once, then not again before 5 s, 10 s, 20 s …
        assert!(r.due(false, s(1)));
        assert!(!r.due(false, s(2)));
        assert!(!r.due(false, s(5)));
        assert!(r.due(false, s(6)));
        assert!(!r.due(false, s(15)));
        assert!(r.due(false, s(16)));
        assert!(!r.due(false, s(35)));
        assert!(r.due(false, s(36)));
        // Runs for a minute: the backoff starts over.
        assert!(!r.due(true, s(40)));
        assert!(!r.due(true, s(100)));
        assert!(r.due(false, s(101)));
        assert!(!r.due(false, s(105)));
        assert!(r.due(false, s(106)));
    }

    #[test]
    fn limits_follow_the_ttl() {
        let l = limits();
        assert_eq!(l.no_connection, Duration::from_secs(5));
        assert_eq!(l.patroni_silent, Duration::from_secs(13));
        let short = GuardLimits::for_ttl(Duration::from_secs(8), Duration::from_secs(1));
        assert_eq!(short.no_connection, Duration::from_secs(3));
        assert_eq!(short.patroni_silent, Duration::from_secs(4));
    }

    #[test]
    fn a_postmaster_that_answers_nothing_is_fenced_after_the_limit() {
        let t0 = Instant::now();
        let mut j = Judge::new(limits(), t0);
        let live = PatroniProbe::Live;
        assert!(j
            .observe(t0, true, Some(Probe::Answered), live, Some(true))
            .is_none());
        let s = |n: u64| t0 + Duration::from_secs(n);
        // First unanswered probe: the probe's own timeout (1 s) already passed.
        assert!(j
            .observe(s(1), true, Some(Probe::NoAnswer), live, None)
            .is_none());
        assert!(j.probe_due(Some(s(1)), s(2)), "probes every tick now");
        assert!(j
            .observe(s(4), true, Some(Probe::NoAnswer), live, None)
            .is_none());
        let why = j
            .observe(s(5), true, Some(Probe::NoAnswer), live, None)
            .expect("fenced after 5 s");
        assert!(why.contains("no new connection"), "{why}");
    }

    #[test]
    fn an_answer_or_a_closed_socket_resets_the_count() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut j = Judge::new(limits(), t0);
        let live = PatroniProbe::Live;
        j.observe(s(1), true, Some(Probe::NoAnswer), live, Some(false));
        j.observe(s(3), true, Some(Probe::Answered), live, None);
        assert!(!j.probe_due(Some(s(3)), s(4)), "back to the slow probe");
        assert!(j
            .observe(s(4), true, Some(Probe::NoAnswer), live, None)
            .is_none());
        j.observe(s(6), true, Some(Probe::Closed), live, None);
        assert!(j
            .observe(s(7), true, Some(Probe::NoAnswer), live, None)
            .is_none());
        // No postmaster: nothing to fence, and the count starts again.
        j.observe(s(8), false, None, live, None);
        assert!(j
            .observe(s(9), true, Some(Probe::NoAnswer), live, None)
            .is_none());
    }

    #[test]
    fn a_silent_patroni_fences_a_primary_but_not_a_replica() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut replica = Judge::new(limits(), t0);
        let mut primary = Judge::new(limits(), t0);
        replica.observe(t0, true, None, PatroniProbe::Live, Some(false));
        primary.observe(t0, true, None, PatroniProbe::Live, Some(true));
        for n in 1..13 {
            assert!(primary
                .observe(s(n), true, None, PatroniProbe::Silent, None)
                .is_none());
        }
        let why = primary
            .observe(s(13), true, None, PatroniProbe::Silent, None)
            .expect("fenced at ttl - loop_wait - 5 s");
        assert!(why.contains("Patroni has not answered"), "{why}");
        assert!(replica
            .observe(s(60), true, None, PatroniProbe::Silent, None)
            .is_none());
        // After the fence the count starts again.
        primary.fenced(s(13));
        assert!(primary
            .observe(s(14), true, None, PatroniProbe::Silent, Some(true))
            .is_none());
    }

    #[test]
    fn a_stalled_loop_on_a_primary_is_fenced_at_once() {
        let t0 = Instant::now();
        let mut j = Judge::new(limits(), t0);
        assert!(j
            .observe(t0, true, None, PatroniProbe::LoopStalled, Some(true))
            .is_some());
        let mut r = Judge::new(limits(), t0);
        assert!(r
            .observe(t0, true, None, PatroniProbe::LoopStalled, Some(false))
            .is_none());
    }

    #[tokio::test]
    async fn probes_see_a_listener_that_answers_one_that_does_not_and_none() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.PGSQL.1");
        let quick = Duration::from_millis(200);
        assert_eq!(probe_postmaster(&path, quick).await, Probe::Closed);
        // A listener that never accepts: the connect succeeds (the backlog), no answer.
        let silent = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(probe_postmaster(&path, quick).await, Probe::NoAnswer);
        drop(silent);
        std::fs::remove_file(&path).unwrap();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 8];
            c.read_exact(&mut req).unwrap();
            assert_eq!(&req[4..], &SSL_REQUEST.to_be_bytes());
            c.write_all(b"N").unwrap();
        });
        assert_eq!(
            probe_postmaster(&path, Duration::from_secs(5)).await,
            Probe::Answered
        );
        server.join().unwrap();
    }
}
