//! A synchronous WAL receiver for a single node: `pg_receivewal --synchronous` streams the
//! embedded server's WAL into a directory on another disk (or the repository host's mount)
//! and is the server's synchronous standby, so a commit is acknowledged only once its WAL is
//! flushed there. Losing the server (or its whole disk) then loses no acknowledged
//! transaction: `dalp restore --keys` puts the received segments (the last one `.partial`)
//! into the rebuilt `pg_wal` and recovery replays them after the archive.
//!
//! The receiver runs as the server user from a replication slot (`dalp_receivewal`, so the
//! server keeps what it has not received), supervised by a thread that restarts it, and
//! becomes synchronous (`synchronous_standby_names` in [`crate::embedded::LIVE_CONF`]) once it
//! streams — not before, or the start-up's own writes would wait for it. While it is down,
//! commits wait (that is the guarantee); `dalp doctor` says so. Segments the archive holds
//! are pruned from the directory every minute.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backup::Backups;
use crate::error::OpsError;
use crate::process::{self, ServerUser};
use crate::RunningCluster;

/// The receiver's `application_name` (what `synchronous_standby_names` names) and slot.
pub const APPLICATION_NAME: &str = "dalp_receivewal";

fn err(context: impl Into<String>, message: impl std::fmt::Display) -> OpsError {
    OpsError::Bootstrap {
        context: context.into(),
        message: message.to_string(),
    }
}

/// Whether `name` is a WAL segment (or its `.partial`) pg_receivewal writes.
fn segment_name(name: &str) -> Option<&str> {
    let base = name.strip_suffix(".partial").unwrap_or(name);
    (base.len() == 24 && base.bytes().all(|b| b.is_ascii_hexdigit())).then_some(base)
}

/// Copies the received WAL in `dir` into the restored `pg_wal` (the `.partial` segment under
/// its full name), as the server user, so recovery replays past the archive's end; then
/// moves those files aside into `dir/replayed-<time>/` (kept, never deleted), so the rebuilt
/// server's receiver starts clean on its new timeline. Returns how many files were copied.
pub fn fill_pg_wal(dir: &Path, pgdata: &Path) -> Result<usize, OpsError> {
    let copied = copy_into_pg_wal(dir, pgdata)?;
    let aside = dir.join(format!(
        "replayed-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::create_dir_all(&aside).map_err(OpsError::io(format!("create {}", aside.display())))?;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if segment_name(&name).is_some() || name.ends_with(".history") {
            std::fs::rename(e.path(), aside.join(&name))
                .map_err(OpsError::io(format!("move {name} aside")))?;
        }
    }
    ServerUser::resolve()?.chown(&aside)?;
    Ok(copied)
}

fn copy_into_pg_wal(dir: &Path, pgdata: &Path) -> Result<usize, OpsError> {
    let user = ServerUser::resolve()?;
    let pg_wal = pgdata.join("pg_wal");
    let mut copied = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(OpsError::io(format!("read {}", dir.display())))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let (target, is_history) = match segment_name(&name) {
            Some(base) => (base.to_string(), false),
            None if name.ends_with(".history") => (name.clone(), true),
            None => continue,
        };
        let to = pg_wal.join(&target);
        // A complete segment wins over a partial one of the same name.
        if to.exists() && (is_history || name.ends_with(".partial")) {
            continue;
        }
        std::fs::copy(e.path(), &to).map_err(OpsError::io(format!("copy {} into pg_wal", name)))?;
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(OpsError::io("chmod"))?;
        user.chown(&to)?;
        copied += 1;
    }
    Ok(copied)
}

/// A running receiver; [`WalReceiver::stop`] (or the cluster's stop) ends it.
pub struct WalReceiver {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicI32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WalReceiver {
    /// Starts the receiver for `cluster` into `dir` and makes it synchronous once it streams
    /// (within `timeout`). It is stopped when the cluster stops.
    pub async fn start(
        cluster: &RunningCluster,
        backups: Backups,
        dir: &Path,
        timeout: Duration,
    ) -> Result<(), OpsError> {
        let user = ServerUser::resolve()?;
        std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(OpsError::io("chmod the WAL receiver directory"))?;
        user.chown(dir)?;
        let bin = crate::embedded::pg_bin(&Default::default()).join("pg_receivewal");
        let connstr = format!(
            "host={} port={} user=postgres application_name={APPLICATION_NAME}",
            cluster.layout().socket_dir().display(),
            cluster.port()
        );
        // The slot keeps on the server what the receiver has not received yet.
        let mut create = Command::new(&bin);
        create
            .args([
                "--create-slot",
                "--if-not-exists",
                "-S",
                APPLICATION_NAME,
                "-d",
                &connstr,
            ])
            .stdin(Stdio::null());
        user.configure(&mut create);
        let out = create
            .output()
            .map_err(OpsError::io("run pg_receivewal --create-slot"))?;
        if !out.status.success() {
            return Err(err(
                "WAL receiver",
                format!(
                    "creating its replication slot failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let log = cluster
            .layout()
            .log_file()
            .with_file_name("pg_receivewal.log");
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicI32::new(0));
        let thread = {
            let (stop, pid, dir) = (stop.clone(), pid.clone(), dir.to_path_buf());
            std::thread::Builder::new()
                .name("dalp-wal-receiver".into())
                .spawn(move || supervise(&bin, &connstr, &dir, &log, &user, &backups, &stop, &pid))
                .map_err(OpsError::io("start the WAL receiver thread"))?
        };
        let receiver = WalReceiver {
            stop,
            pid,
            thread: Some(thread),
        };
        // Synchronous only once it streams.
        let su = cluster.superuser_options("postgres");
        let deadline = Instant::now() + timeout;
        loop {
            let streaming = match su.connect().await {
                Ok(c) => c
                    .query_opt(
                        "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                        &[&APPLICATION_NAME],
                    )
                    .await
                    .ok()
                    .flatten()
                    .is_some(),
                Err(_) => false,
            };
            if streaming {
                break;
            }
            if Instant::now() > deadline {
                let mut r = receiver;
                r.stop();
                return Err(err(
                    "WAL receiver",
                    format!(
                        "not streaming after {timeout:?}; see {}",
                        cluster
                            .layout()
                            .log_file()
                            .with_file_name("pg_receivewal.log")
                            .display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conf = cluster.live_conf();
        std::fs::write(
            &conf,
            format!(
                "# Written by dalp: the WAL receiver is the synchronous standby.\nsynchronous_standby_names = '{APPLICATION_NAME}'\n"
            ),
        )
        .map_err(OpsError::io(format!("write {}", conf.display())))?;
        let c = su
            .connect()
            .await
            .map_err(|e| err("WAL receiver", format!("connect to reload: {e}")))?;
        c.execute("SELECT pg_reload_conf()", &[])
            .await
            .map_err(|e| err("WAL receiver", format!("reload: {e}")))?;
        let mut receiver = receiver;
        cluster.after_stop(Box::new(move || receiver.stop()));
        Ok(())
    }

    /// Ends the receiver and its supervisor.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let pid = self.pid.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    bin: &Path,
    connstr: &str,
    dir: &Path,
    log: &Path,
    user: &ServerUser,
    backups: &Backups,
    stop: &AtomicBool,
    pid: &AtomicI32,
) {
    let mut last_prune = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log);
        let mut cmd = Command::new(bin);
        cmd.args([
            "-D",
            &dir.display().to_string(),
            "-S",
            APPLICATION_NAME,
            "--synchronous",
            "-d",
            connstr,
        ])
        .stdin(Stdio::null());
        if let Ok(f) = out {
            if let Ok(g) = f.try_clone() {
                cmd.stdout(f).stderr(g);
            }
        }
        user.configure(&mut cmd);
        let mut child = match process::spawn(cmd) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "starting pg_receivewal");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        pid.store(child.id() as i32, Ordering::SeqCst);
        loop {
            if stop.load(Ordering::SeqCst) {
                let _ = process::stop_child(
                    &mut child,
                    nix::sys::signal::Signal::SIGTERM,
                    Duration::from_secs(10),
                );
                return;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(%status, "pg_receivewal exited; restarting it (commits wait meanwhile)");
                    break;
                }
                Ok(None) => {}
                Err(_) => break,
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                prune(dir, backups);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        pid.store(0, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Removes complete segments the archive already holds (by position, any timeline).
fn prune(dir: &Path, backups: &Backups) {
    let Ok(Some((_, max))) = backups.archived_wal(1) else {
        return;
    };
    let max_pos = crate::backup::wal_position(&max);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") {
            continue;
        }
        if let Some(base) = segment_name(&name) {
            if crate::backup::wal_position(base) < max_pos {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_segments_and_their_partials() {
        assert_eq!(
            segment_name("000000010000000000000003.partial"),
            Some("000000010000000000000003")
        );
        assert_eq!(
            segment_name("000000010000000000000003"),
            Some("000000010000000000000003")
        );
        assert_eq!(segment_name("00000002.history"), None);
        assert_eq!(segment_name("archive_status"), None);
    }
}
