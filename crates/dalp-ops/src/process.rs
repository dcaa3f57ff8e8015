//! Starting server processes as the right system user and making sure they die with us.
//!
//! PostgreSQL refuses to run as root, so when dalp runs as root, children run as the
//! `postgres` system user. Children get `PR_SET_PDEATHSIG`, so they are told to shut down
//! when dalp dies however it dies. That signal fires when the *thread* that forked the child
//! exits, so every spawn happens on one keeper thread that lives as long as the process.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};

use crate::error::OpsError;

/// The system user server processes run as.
#[derive(Debug, Clone)]
pub struct ServerUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// True when we must switch to this user (we are root).
    pub switch: bool,
}

impl ServerUser {
    /// `postgres` when running as root, otherwise ourselves.
    pub fn resolve() -> Result<ServerUser, OpsError> {
        if Uid::effective().is_root() {
            let u = User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(OpsError::NoServerUser)?;
            Ok(ServerUser {
                name: u.name,
                uid: u.uid,
                gid: u.gid,
                switch: true,
            })
        } else {
            let uid = Uid::effective();
            let name = User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| uid.to_string());
            Ok(ServerUser {
                name,
                uid,
                gid: Gid::effective(),
                switch: false,
            })
        }
    }

    /// Gives `path` to this user (no-op unless we switch users).
    pub fn chown(&self, path: &Path) -> Result<(), OpsError> {
        if !self.switch {
            return Ok(());
        }
        nix::unistd::chown(path, Some(self.uid), Some(self.gid)).map_err(|e| OpsError::Io {
            context: format!("chown {} to {}", path.display(), self.name),
            source: e.into(),
        })
    }

    /// Fails with a clear message when this user cannot traverse every parent of `dir`.
    pub fn check_traversable(&self, dir: &Path) -> Result<(), OpsError> {
        if !self.switch {
            return Ok(());
        }
        let mut ancestors: Vec<PathBuf> = dir.ancestors().map(Path::to_path_buf).collect();
        ancestors.reverse();
        for p in ancestors {
            let meta =
                std::fs::metadata(&p).map_err(OpsError::io(format!("stat {}", p.display())))?;
            let mode = meta.mode();
            let allowed = if meta.uid() == self.uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == self.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !allowed {
                return Err(OpsError::NotTraversable {
                    path: p,
                    user: self.name.clone(),
                    mode: mode & 0o7777,
                });
            }
        }
        Ok(())
    }

    /// Prepares `cmd` to run as this user, in its own process group (so a terminal's Ctrl-C
    /// reaches dalp, which then stops the server in order), dying with dalp.
    pub fn configure(&self, cmd: &mut Command) {
        if self.switch {
            cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
        }
        cmd.env("LC_ALL", "C").env_remove("PGPASSWORD");
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl ServerUser {
    /// Prepares `cmd` to run as this user as a daemon: its own session, so it outlives the
    /// dalp that started it (stopped later by its recorded pid).
    pub fn configure_daemon(&self, cmd: &mut Command) {
        if self.switch {
            cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
        }
        cmd.env("LC_ALL", "C").env_remove("PGPASSWORD");
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the keeper thread (see the module docs).
pub fn spawn(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("dalp-process-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("process keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("process keeper thread is gone"))?
}

/// The last `n` lines of the log file at `path` (empty when it cannot be read), for
/// errors that say why a server did not start.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The server's own explanation of why it stopped: the last `FATAL:` or `PANIC:` line of the
/// log file at `path`, from the level on (none when there is none or it cannot be read).
pub fn last_fatal(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    fatal_in(&text)
}

fn fatal_in(text: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        ["FATAL:", "PANIC:"]
            .iter()
            .find_map(|level| l.find(level).map(|i| l[i..].trim().to_string()))
    })
}

/// Whether a process with `pid` exists (signal 0).
pub fn alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Sends `first`, waits up to `grace` for the child to exit, then SIGKILL. Returns once the
/// child is reaped.
pub fn stop_child(child: &mut Child, first: Signal, grace: Duration) -> io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, first);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = kill(pid, Signal::SIGKILL);
    child.wait().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_fatal_line_is_the_reason() {
        let log = "2026-11-29 LOG:  starting\n\
                   2026-11-29 FATAL:  recovery ended before configured recovery target was reached\n\
                   2026-11-29 LOG:  startup process (PID 7) exited with exit code 1\n";
        assert_eq!(
            fatal_in(log).as_deref(),
            Some("FATAL:  recovery ended before configured recovery target was reached")
        );
        assert_eq!(fatal_in("LOG: fine\n"), None);
    }
}
