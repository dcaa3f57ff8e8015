//! Backups, WAL archiving and point-in-time recovery with pgBackRest.
//!
//! dalp writes pgBackRest's configuration from a [`Policy`] (the data-protection table:
//! WAL kept 30 days for point-in-time recovery, daily full backups kept 90 days in repo1,
//! weekly full backups kept 7 years in repo2) and drives `pgbackrest` as the `postgres`
//! user. Retention is enforced by pgBackRest's `expire`, which runs after every backup.
//!
//! Layout under `DIR/backup/`: `pgbackrest.conf` (0600, the server user's), `repo1/` and
//! `repo2/` (for posix repositories), `log/`, `lock/`, `spool/`. The policy comes from
//! `DIR/backup.toml` when it exists, else from the defaults.
//!
//! Repositories are encrypted (`aes-256-cbc`) from their first byte: the cipher passphrase
//! is made when dalp first writes the configuration of repositories that hold nothing yet,
//! and kept in `DIR/keys/backup-cipher.pass` (0600) with the other keys — never in the
//! database, and exported with them by `dalp keys export`. A repository that already held
//! unencrypted backups stays unencrypted (`dalp doctor` says so).
//!
//! WAL is kept for the point-in-time window in time, not in a number of backups: after each
//! backup dalp expires archived WAL only before the newest full backup that ended before
//! the window's start, however many ad-hoc fulls were taken.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use dalp_db::connect::ConnectOptions;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::OpsError;
use crate::process::{self, ServerUser};

/// pgBackRest's stanza (the cluster's name in the repositories).
pub const STANZA: &str = "dalp";
/// The repositories' cipher passphrase, in the instance's `keys/` directory.
pub const CIPHER_FILE: &str = "backup-cipher.pass";
/// pgBackRest's cipher for encrypted repositories.
pub const CIPHER_TYPE: &str = "aes-256-cbc";
const PGBACKREST_BIN: &str = "/usr/bin/pgbackrest";

/// Whether pgBackRest is installed.
pub fn available() -> bool {
    Path::new(PGBACKREST_BIN).exists()
}

fn err(context: impl Into<String>, message: impl std::fmt::Display) -> OpsError {
    OpsError::Bootstrap {
        context: context.into(),
        message: message.to_string(),
    }
}

/// Where a repository lives. Keys for the cloud stores are never written to the
/// configuration: pgBackRest reads them from its environment
/// (`PGBACKREST_REPO1_S3_KEY`, `PGBACKREST_REPO1_S3_KEY_SECRET`, `PGBACKREST_REPO2_AZURE_KEY`, …).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Repo {
    Posix {
        path: PathBuf,
    },
    S3 {
        bucket: String,
        endpoint: String,
        region: String,
        #[serde(default = "default_repo_path")]
        path: String,
        /// `host` (default) or `path` style URIs (MinIO and most S3-compatible stores).
        #[serde(default)]
        uri_style: Option<String>,
    },
    Gcs {
        bucket: String,
        #[serde(default = "default_repo_path")]
        path: String,
        /// Service-account key file.
        key_file: PathBuf,
    },
    Azure {
        account: String,
        container: String,
        #[serde(default = "default_repo_path")]
        path: String,
    },
}

fn default_repo_path() -> String {
    "/dalp".into()
}

/// The data-protection policy. Every field has the default of the policy table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Days back a point-in-time recovery can reach (WAL kept in repo1). Default 30.
    pub pitr_days: u32,
    /// Hours between full backups to repo1. Default 24 (daily).
    pub full_every_hours: u32,
    /// Days full backups are kept in repo1. Default 90.
    pub full_retention_days: u32,
    /// Days between full backups to repo2, the long-term archive. Default 7 (weekly).
    pub archive_every_days: u32,
    /// Days repo2 keeps its backups. Default 2557 (7 years).
    pub archive_retention_days: u32,
    /// repo1; default a posix repository in `DIR/backup/repo1`.
    pub repo1: Option<Repo>,
    /// repo2; default a posix repository in `DIR/backup/repo2`.
    pub repo2: Option<Repo>,
    /// Parallel processes for backup and restore. Default 2.
    pub process_max: u32,
    /// `lz4` (default), `zst`, `gz`, `bz2` or `none`.
    pub compress_type: String,
    /// Seconds a backup waits for its WAL to be archived before failing. Default 60.
    pub archive_timeout_secs: u32,
    /// Recovery point objective of WAL archiving, in seconds: the server switches WAL
    /// segments at least this often (`archive_timeout`), so losing the server loses at most
    /// this much committed work that the archive lacks. 1 to 3600. Default 60.
    pub rpo_secs: u32,
    /// Encrypt new repositories (pgBackRest `aes-256-cbc`; the key in
    /// `keys/backup-cipher.pass`). Default true.
    pub encrypt: bool,
    /// A synchronous WAL receiver (`pg_receivewal --synchronous`) into this directory, on
    /// another disk or the repository host's mount: a crash then loses no acknowledged
    /// transaction (RPO 0) instead of up to `rpo_secs`. Commits wait for it. Single node
    /// (`dalp up`) only; default none.
    pub wal_receiver_dir: Option<PathBuf>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            pitr_days: 30,
            full_every_hours: 24,
            full_retention_days: 90,
            archive_every_days: 7,
            archive_retention_days: 2557,
            repo1: None,
            repo2: None,
            process_max: 2,
            compress_type: "lz4".into(),
            archive_timeout_secs: 60,
            rpo_secs: 60,
            encrypt: true,
            wal_receiver_dir: None,
        }
    }
}

impl Policy {
    /// Writes the policy to `path` as TOML.
    pub fn save(&self, path: &Path) -> Result<(), OpsError> {
        let text = toml::to_string(self).map_err(|e| err("backup policy", e))?;
        std::fs::write(path, text).map_err(OpsError::io(format!("write {}", path.display())))
    }

    /// Loads `path` (TOML) if it exists, else the defaults; validates either.
    pub fn load(path: &Path) -> Result<Policy, OpsError> {
        let policy = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| err(format!("backup policy {}", path.display()), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Policy::default(),
            Err(e) => return Err(err(format!("read {}", path.display()), e)),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the policy is coherent: the PITR window lies within full-backup retention,
    /// there is a full backup at least once per PITR window, and the archive keeps longer
    /// and less often than the daily tier.
    pub fn validate(&self) -> Result<(), OpsError> {
        let bad = |m: String| Err(err("backup policy", m));
        if self.pitr_days == 0 || self.full_every_hours == 0 || self.archive_every_days == 0 {
            return bad(
                "pitr_days, full_every_hours and archive_every_days must be at least 1".into(),
            );
        }
        if self.pitr_days > self.full_retention_days {
            return bad(format!(
                "pitr_days ({}) exceeds full_retention_days ({}): WAL would outlive the backups it replays onto",
                self.pitr_days, self.full_retention_days
            ));
        }
        if self.full_every_hours > self.pitr_days * 24 {
            return bad(format!(
                "full_every_hours ({}) is longer than the PITR window ({} days): part of the window would have no base backup",
                self.full_every_hours, self.pitr_days
            ));
        }
        if self.archive_retention_days < self.full_retention_days {
            return bad(format!(
                "archive_retention_days ({}) is shorter than full_retention_days ({}): the archive tier must keep longer",
                self.archive_retention_days, self.full_retention_days
            ));
        }
        if self.archive_every_days * 24 < self.full_every_hours {
            return bad(
                "archive_every_days must not be more frequent than full_every_hours".into(),
            );
        }
        if self.archive_timeout_secs == 0 {
            return bad("archive_timeout_secs must be at least 1".into());
        }
        if !(1..=3600).contains(&self.rpo_secs) {
            return bad(format!(
                "rpo_secs ({}) must be 1 to 3600 (the server's archive_timeout)",
                self.rpo_secs
            ));
        }
        if self.process_max == 0 || self.process_max > 64 {
            return bad("process_max must be 1 to 64".into());
        }
        if !["lz4", "zst", "gz", "bz2", "none"].contains(&self.compress_type.as_str()) {
            return bad(format!(
                "compress_type `{}` is not one of lz4, zst, gz, bz2, none",
                self.compress_type
            ));
        }
        if self.repo1.is_some() && self.repo1 == self.repo2 {
            return bad("repo1 and repo2 must be different repositories".into());
        }
        Ok(())
    }

    /// Full backups of repo1 whose WAL pgBackRest's own expiry keeps: every full the policy
    /// retains, so its automatic expiry never cuts into the window. dalp's expiry after each
    /// backup ([`Backups::expire_wal`]) then trims WAL to the window in time.
    pub fn repo1_archive_backups(&self) -> u32 {
        (self.full_retention_days * 24)
            .div_ceil(self.full_every_hours)
            .max(1)
    }
}

/// One PostgreSQL data directory pgBackRest backs up (several for an HA cluster; it
/// finds the primary among them).
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: Option<u16>,
    /// The address of the host it runs on, when that is another host (reached through
    /// that host's `pgbackrest server`, [`TlsSite`]) and the path of pgBackRest's
    /// configuration there; `None`: this host.
    pub host: Option<(String, PathBuf)>,
}

/// pgBackRest between hosts: the repositories on a repository host of their own, every
/// database host reaching them — and the repository host reaching every database host —
/// through `pgbackrest server` over TLS with client certificates from the cluster's CA.
#[derive(Debug, Clone)]
pub struct TlsSite {
    /// This host's certificate and key (its identity as server and client) and the CA.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// This host's address, where its `pgbackrest server` listens.
    pub listen: String,
    /// The port every host's `pgbackrest server` uses.
    pub port: u16,
    /// Certificate CNs (host names) that may use this host's server.
    pub clients: Vec<String>,
    /// The repository host's address and the path of pgBackRest's configuration there,
    /// when the repositories are not on this host.
    pub repository: Option<(String, PathBuf)>,
}

impl TlsSite {
    /// The options that reach `host`'s `pgbackrest server` (running with its configuration
    /// at `config`) for `prefix` (`repoN` or `pgN`): TLS with this host's certificate.
    fn remote_lines(&self, prefix: &str, host: &str, config: &Path) -> [String; 7] {
        [
            format!("{prefix}-host={host}"),
            format!("{prefix}-host-config={}", config.display()),
            format!("{prefix}-host-type=tls"),
            format!("{prefix}-host-port={}", self.port),
            format!("{prefix}-host-cert-file={}", self.cert.display()),
            format!("{prefix}-host-key-file={}", self.key.display()),
            format!("{prefix}-host-ca-file={}", self.ca.display()),
        ]
    }
}

/// A backup as pgBackRest lists it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub label: String,
    pub repo: u8,
    /// `full`, `diff` or `incr`.
    pub kind: String,
    pub started: DateTime<Utc>,
    pub stopped: DateTime<Utc>,
    pub lsn_start: String,
    pub lsn_stop: String,
    pub wal_start: String,
    pub wal_stop: String,
    /// Database size it covers (bytes).
    pub size: u64,
    /// Bytes stored in the repository.
    pub repo_size: u64,
}

impl BackupInfo {
    pub fn duration(&self) -> Duration {
        (self.stopped - self.started).to_std().unwrap_or_default()
    }
}

/// What to recover to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Time(DateTime<Utc>),
    Lsn(String),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
    /// The end of the archive.
    Latest,
}

/// The span a restore can reach, from one repository: from the end of the oldest backup
/// whose WAL is still archived to the newest archived WAL segment.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub repo: u8,
    /// The end of the oldest restorable backup (the earliest consistent point).
    pub earliest: DateTime<Utc>,
    pub earliest_lsn: String,
    /// The newest archived WAL segment, and when it reached the repository (known for
    /// posix repositories): no target after it can be reached.
    pub latest_wal: Option<String>,
    pub latest: Option<DateTime<Utc>>,
}

impl Window {
    /// "FROM (LSN X) to TO" for messages.
    pub fn describe(&self) -> String {
        format!(
            "the recoverable window of repo{} is {} (LSN {}) to {}",
            self.repo,
            self.earliest.to_rfc3339(),
            self.earliest_lsn,
            match (&self.latest, &self.latest_wal) {
                (Some(t), Some(w)) =>
                    format!("{} (WAL segment {w}, the newest archived)", t.to_rfc3339()),
                (None, Some(w)) => format!("the end of WAL segment {w} (the newest archived)"),
                _ => "the end of the archive".into(),
            }
        )
    }
}

/// The LSN just past WAL segment `segment` (16 MiB segments, PostgreSQL's default and
/// dalp's).
fn segment_end(segment: &str) -> Option<u64> {
    let log = u64::from_str_radix(segment.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(segment.get(16..24)?, 16).ok()?;
    Some((log << 32) + (seg + 1) * (16 << 20))
}

/// A WAL segment name's position (log and segment, without the timeline).
pub(crate) fn wal_position(segment: &str) -> &str {
    segment.get(8..).unwrap_or(segment)
}

/// pgBackRest for one cluster.
#[derive(Debug, Clone)]
pub struct Backups {
    dir: PathBuf,
    policy: Policy,
    targets: Vec<PgTarget>,
    user: ServerUser,
    site: Option<TlsSite>,
}

/// Parses `X/Y` into a number for comparisons.
fn lsn_value(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

impl Backups {
    /// `dir` is the backup directory (`DATA_DIR/backup`); `targets` the data directories.
    pub fn new(dir: &Path, policy: Policy, targets: Vec<PgTarget>) -> Result<Backups, OpsError> {
        policy.validate()?;
        Ok(Backups {
            dir: dir.to_path_buf(),
            policy,
            targets,
            user: ServerUser::resolve()?,
            site: None,
        })
    }

    /// The same, on one host of several ([`TlsSite`]).
    pub fn on_site(mut self, site: TlsSite) -> Backups {
        self.site = Some(site);
        self
    }

    /// The TLS endpoints, when the repositories and servers are on different hosts.
    pub fn site(&self) -> Option<&TlsSite> {
        self.site.as_ref()
    }

    /// Whether the repositories are on this host (always, unless a repository host holds them).
    pub fn holds_repositories(&self) -> bool {
        self.site.as_ref().is_none_or(|s| s.repository.is_none())
    }

    /// The `pgbackrest server` of this host, as a command for a daemon (run as the server
    /// user): serves the repositories (on the repository host) or this host's data directory
    /// (on a database host) to the other hosts over TLS.
    pub fn server_command(&self) -> Command {
        let mut cmd = Command::new(PGBACKREST_BIN);
        cmd.arg(format!("--config={}", self.config_path().display()))
            .arg("server")
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pgbackrest.conf")
    }

    /// The `archive_command` the server runs for each WAL segment.
    pub fn archive_command(&self) -> String {
        format!(
            "{PGBACKREST_BIN} --config={} --stanza={STANZA} archive-push %p",
            self.config_path().display()
        )
    }

    /// The `archive_command` of one node of several: WAL paths are relative to the node's
    /// own data directory, so the node names it (`pg1-path` on the command line).
    pub fn archive_command_for(&self, data_dir: &Path) -> String {
        format!(
            "{PGBACKREST_BIN} --config={} --stanza={STANZA} --pg1-path={} archive-push %p",
            self.config_path().display(),
            data_dir.display()
        )
    }

    /// The `restore_command` of one node of several (see [`Backups::archive_command_for`]).
    pub fn restore_command_for(&self, data_dir: &Path) -> String {
        format!(
            "{PGBACKREST_BIN} --config={} --stanza={STANZA} --pg1-path={} archive-get %f \"%p\"",
            self.config_path().display(),
            data_dir.display()
        )
    }

    /// The `restore_command` a replica or restored copy fetches WAL with.
    pub fn restore_command(&self) -> String {
        format!(
            "{PGBACKREST_BIN} --config={} --stanza={STANZA} archive-get %f \"%p\"",
            self.config_path().display()
        )
    }

    fn repo_lines(&self, n: u8, repo: &Option<Repo>, out: &mut Vec<String>) {
        if let Some((s, (host, config))) = self
            .site
            .as_ref()
            .and_then(|s| s.repository.as_ref().map(|h| (s, h)))
        {
            // The server there runs each request with this configuration (its repositories).
            out.extend(s.remote_lines(&format!("repo{n}"), host, config));
            // Its path there, too: a database host serving the repository host's requests
            // checks that the repositories it knows of are distinct.
            let path = match repo {
                None => config.parent().map(|d| d.join(format!("repo{n}"))),
                Some(Repo::Posix { path }) => Some(path.clone()),
                Some(_) => None,
            };
            if let Some(p) = path {
                out.push(format!("repo{n}-path={}", p.display()));
            }
            return;
        }
        let default = Repo::Posix {
            path: self.dir.join(format!("repo{n}")),
        };
        match repo.as_ref().unwrap_or(&default) {
            Repo::Posix { path } => out.push(format!("repo{n}-path={}", path.display())),
            Repo::S3 {
                bucket,
                endpoint,
                region,
                path,
                uri_style,
            } => {
                out.push(format!("repo{n}-type=s3"));
                out.push(format!("repo{n}-path={path}"));
                out.push(format!("repo{n}-s3-bucket={bucket}"));
                out.push(format!("repo{n}-s3-endpoint={endpoint}"));
                out.push(format!("repo{n}-s3-region={region}"));
                if let Some(u) = uri_style {
                    out.push(format!("repo{n}-s3-uri-style={u}"));
                }
            }
            Repo::Gcs {
                bucket,
                path,
                key_file,
            } => {
                out.push(format!("repo{n}-type=gcs"));
                out.push(format!("repo{n}-path={path}"));
                out.push(format!("repo{n}-gcs-bucket={bucket}"));
                out.push(format!("repo{n}-gcs-key={}", key_file.display()));
            }
            Repo::Azure {
                account,
                container,
                path,
            } => {
                out.push(format!("repo{n}-type=azure"));
                out.push(format!("repo{n}-path={path}"));
                out.push(format!("repo{n}-azure-account={account}"));
                out.push(format!("repo{n}-azure-container={container}"));
            }
        }
    }

    /// The local directory of posix repository `n`, if it is one.
    fn local_repo_dir(&self, n: u8) -> Option<PathBuf> {
        let repo = if n == 1 {
            &self.policy.repo1
        } else {
            &self.policy.repo2
        };
        match repo {
            None => Some(self.dir.join(format!("repo{n}"))),
            Some(Repo::Posix { path }) => Some(path.clone()),
            Some(_) => None,
        }
    }

    /// The repositories' local directories (posix repositories only).
    /// Whether the stanza exists in the repositories this side holds on its disk (their
    /// `backup.info`); false when it holds none there.
    pub fn stanza_exists(&self) -> bool {
        let dirs = self.local_repo_dirs();
        !dirs.is_empty()
            && dirs
                .iter()
                .all(|d| d.join("backup").join(STANZA).join("backup.info").exists())
    }

    fn local_repo_dirs(&self) -> Vec<PathBuf> {
        if !self.holds_repositories() {
            return Vec::new();
        }
        [(1u8, &self.policy.repo1), (2, &self.policy.repo2)]
            .into_iter()
            .filter_map(|(n, r)| match r {
                None => Some(self.dir.join(format!("repo{n}"))),
                Some(Repo::Posix { path }) => Some(path.clone()),
                Some(_) => None,
            })
            .collect()
    }

    /// `DIR/keys/backup-cipher.pass` beside the backup directory `DIR/backup`.
    pub fn cipher_file(&self) -> PathBuf {
        self.dir
            .parent()
            .unwrap_or(&self.dir)
            .join("keys")
            .join(CIPHER_FILE)
    }

    /// Whether the repositories are encrypted (their cipher passphrase exists).
    pub fn is_encrypted(&self) -> bool {
        self.cipher_file().exists()
    }

    /// The cipher passphrase: the kept one, or a new one when the policy encrypts and no
    /// local repository holds anything yet (an existing unencrypted repository cannot
    /// switch: its backups and WAL would no longer read).
    fn cipher_pass(&self) -> Result<Option<String>, OpsError> {
        let file = self.cipher_file();
        if file.exists() {
            let pass = std::fs::read_to_string(&file)
                .map_err(OpsError::io(format!("read {}", file.display())))?;
            return Ok(Some(pass.trim().to_string()));
        }
        if !self.policy.encrypt {
            return Ok(None);
        }
        let holds_something = |d: &Path| {
            std::fs::read_dir(d)
                .map(|mut e| e.next().is_some())
                .unwrap_or(false)
        };
        if self.local_repo_dirs().iter().any(|d| holds_something(d)) {
            return Ok(None);
        }
        let pass = hex::encode(rand::random::<[u8; 32]>());
        let keys = file.parent().expect("keys dir");
        std::fs::create_dir_all(keys)
            .map_err(OpsError::io(format!("create {}", keys.display())))?;
        std::fs::set_permissions(keys, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(OpsError::io("chmod keys dir"))?;
        crate::pki::write_private(&file, &pass)?;
        Ok(Some(pass))
    }

    /// Writes `pgbackrest.conf` and creates the local directories (owned by the server
    /// user, who runs every pgBackRest command and the archive command).
    pub fn write_config(&self) -> Result<(), OpsError> {
        let p = &self.policy;
        let cipher = self.cipher_pass()?;
        let mut dirs = vec![
            self.dir.clone(),
            self.dir.join("log"),
            self.dir.join("lock"),
            self.dir.join("spool"),
        ];
        dirs.extend(self.local_repo_dirs());
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(OpsError::io(format!("create {}", d.display())))?;
            self.user.chown(d)?;
        }
        let mut g = vec![
            "# Written by dalp from the backup policy; local edits are overwritten.".to_string(),
            "[global]".into(),
        ];
        self.repo_lines(1, &p.repo1, &mut g);
        g.push("repo1-retention-full-type=time".into());
        g.push(format!("repo1-retention-full={}", p.full_retention_days));
        g.push("repo1-retention-archive-type=full".into());
        g.push(format!(
            "repo1-retention-archive={}",
            p.repo1_archive_backups()
        ));
        self.repo_lines(2, &p.repo2, &mut g);
        g.push("repo2-retention-full-type=time".into());
        g.push(format!("repo2-retention-full={}", p.archive_retention_days));
        g.push("repo2-retention-archive-type=full".into());
        g.push("repo2-retention-archive=1".into());
        if let Some(pass) = &cipher {
            for n in [1, 2] {
                g.push(format!("repo{n}-cipher-type={CIPHER_TYPE}"));
                g.push(format!("repo{n}-cipher-pass={pass}"));
            }
        }
        g.extend([
            format!("log-path={}", self.dir.join("log").display()),
            format!("lock-path={}", self.dir.join("lock").display()),
            format!("spool-path={}", self.dir.join("spool").display()),
            "log-level-console=info".into(),
            "log-level-file=detail".into(),
            format!("compress-type={}", p.compress_type),
            "compress-level=1".into(),
            format!("process-max={}", p.process_max),
            "start-fast=y".into(),
            format!("archive-timeout={}", p.archive_timeout_secs),
        ]);
        if let Some(s) = &self.site {
            g.push(format!("tls-server-address={}", s.listen));
            g.push(format!("tls-server-port={}", s.port));
            g.push(format!("tls-server-cert-file={}", s.cert.display()));
            g.push(format!("tls-server-key-file={}", s.key.display()));
            g.push(format!("tls-server-ca-file={}", s.ca.display()));
            for cn in &s.clients {
                g.push(format!("tls-server-auth={cn}={STANZA}"));
            }
        }
        g.extend([String::new(), format!("[{STANZA}]")]);
        for (i, t) in self.targets.iter().enumerate() {
            let n = i + 1;
            if let (Some((host, config)), Some(s)) = (&t.host, &self.site) {
                g.extend(s.remote_lines(&format!("pg{n}"), host, config));
            }
            g.push(format!("pg{n}-path={}", t.data_dir.display()));
            g.push(format!("pg{n}-socket-path={}", t.socket_dir.display()));
            if let Some(port) = t.port {
                g.push(format!("pg{n}-port={port}"));
            }
            g.push(format!("pg{n}-user=postgres"));
        }
        g.push(String::new());
        // It holds the cipher passphrase: only the server user (and root) read it.
        let path = self.config_path();
        crate::pki::write_private(&path, &g.join("\n"))?;
        self.user.chown(&path)?;
        Ok(())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(PGBACKREST_BIN);
        cmd.arg(format!("--config={}", self.config_path().display()))
            .arg(format!("--stanza={STANZA}"))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        self.user.configure(&mut cmd);
        cmd
    }

    /// Whether the backup directory exists (it does not when the instance was started with
    /// `--no-archive` and never backed up).
    pub fn is_set_up(&self) -> bool {
        self.dir.is_dir()
    }

    /// The backup directory (configuration, repositories, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs pgBackRest, returning its stdout; on failure, the ERROR lines it printed.
    /// `progress` receives each line of output as it appears.
    pub fn run(&self, args: &[&str], progress: &dyn Fn(&str)) -> Result<String, OpsError> {
        use std::io::{BufRead, BufReader};
        if !self.is_set_up() {
            // Spawning in a missing directory fails with a bare ENOENT that reads as if
            // pgBackRest itself were missing.
            return Err(err(
                format!("backup directory {}", self.dir.display()),
                "does not exist: WAL archiving and backups were never set up for this instance (started with --no-archive?); restart `dalp up` without --no-archive",
            ));
        }
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = process::spawn(cmd)
            .map_err(OpsError::io(format!("run pgbackrest {}", args.join(" "))))?;
        let stderr = child.stderr.take().expect("piped");
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                s.push_str(&String::from_utf8_lossy(&line));
                s.push('\n');
            }
            s
        });
        let mut out = String::new();
        // Lines as text even when pgBackRest quotes undecodable bytes (an error message
        // showing an encrypted file read as plain text): `lines()` would stop there.
        for line in BufReader::new(child.stdout.take().expect("piped"))
            .split(b'\n')
            .map_while(Result::ok)
            .map(|l| String::from_utf8_lossy(&l).into_owned())
        {
            progress(&line);
            out.push_str(&line);
            out.push('\n');
        }
        let status = child.wait().map_err(OpsError::io("wait for pgbackrest"))?;
        let stderr = err_thread.join().unwrap_or_default();
        if !status.success() {
            let errors: Vec<&str> = out
                .lines()
                .chain(stderr.lines())
                .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                .collect();
            return Err(err(
                format!("pgbackrest {}", args.first().copied().unwrap_or("")),
                format!(
                    "failed ({status}): {}",
                    if errors.is_empty() {
                        stderr.trim().to_string()
                    } else {
                        errors.join("; ")
                    }
                ),
            ));
        }
        Ok(out)
    }

    /// Creates the stanza in both repositories (idempotent) and checks that archiving works.
    pub fn stanza_create(&self) -> Result<(), OpsError> {
        self.run(&["stanza-create"], &|_| {})?;
        Ok(())
    }

    /// Forces a WAL switch and waits until the segment is archived (pgBackRest `check`).
    pub fn check(&self) -> Result<(), OpsError> {
        self.run(&["check"], &|_| {})?;
        Ok(())
    }

    /// Takes a backup of `kind` (`full`, `diff`, `incr`) into `repo`, then expires what the
    /// policy no longer keeps. Returns the new backup.
    pub fn backup(
        &self,
        kind: &str,
        repo: u8,
        progress: &dyn Fn(&str),
    ) -> Result<BackupInfo, OpsError> {
        if !["full", "diff", "incr"].contains(&kind) {
            return Err(err(
                "backup type",
                format!("`{kind}` is not full, diff or incr"),
            ));
        }
        if !(1..=2).contains(&repo) {
            return Err(err(
                "backup repository",
                format!("repo{repo} does not exist (1 or 2)"),
            ));
        }
        let before: Vec<String> = self.list()?.into_iter().map(|b| b.label).collect();
        self.run(
            &[
                "backup",
                &format!("--type={kind}"),
                &format!("--repo={repo}"),
            ],
            progress,
        )
        .map_err(|e| self.explain_failure(e))?;
        self.run(&["expire", &format!("--repo={repo}")], progress)?;
        if repo == 1 {
            self.expire_wal(Utc::now(), progress)?;
        }
        self.list()?
            .into_iter()
            .filter(|b| b.repo == repo)
            .find(|b| !before.contains(&b.label))
            .ok_or_else(|| {
                err(
                    "backup",
                    "pgbackrest reported success but lists no new backup",
                )
            })
    }

    /// Adds what the disk says to a failed backup or archive: a full local repository shows
    /// up in pgBackRest only as an archive timeout.
    fn explain_failure(&self, e: OpsError) -> OpsError {
        let mut notes = Vec::new();
        for dir in self.local_repo_dirs() {
            if let Ok(st) = nix::sys::statvfs::statvfs(&dir) {
                let free = st.blocks_available() * st.fragment_size();
                if free < 64 << 20 {
                    notes.push(format!(
                        "the repository at {} has only {} kB free: no space left on its device; free space or move the repository (backup.toml), then run the backup again",
                        dir.display(),
                        free / 1024
                    ));
                }
            }
        }
        if notes.is_empty() {
            return e;
        }
        err(e.to_string(), notes.join("; "))
    }

    /// Every backup in every repository, oldest first.
    pub fn list(&self) -> Result<Vec<BackupInfo>, OpsError> {
        let out = self.run(&["info", "--output=json"], &|_| {})?;
        let v: Value = serde_json::from_str(&out).map_err(|e| err("pgbackrest info", e))?;
        let mut list = Vec::new();
        for stanza in v.as_array().into_iter().flatten() {
            for b in stanza["backup"].as_array().into_iter().flatten() {
                let ts = |k: &str| {
                    Utc.timestamp_opt(b["timestamp"][k].as_i64().unwrap_or(0), 0)
                        .single()
                        .unwrap_or_default()
                };
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                list.push(BackupInfo {
                    label: s(&b["label"]),
                    repo: b["database"]["repo-key"].as_u64().unwrap_or(1) as u8,
                    kind: s(&b["type"]),
                    started: ts("start"),
                    stopped: ts("stop"),
                    lsn_start: s(&b["lsn"]["start"]),
                    lsn_stop: s(&b["lsn"]["stop"]),
                    wal_start: s(&b["archive"]["start"]),
                    wal_stop: s(&b["archive"]["stop"]),
                    size: b["info"]["size"].as_u64().unwrap_or(0),
                    repo_size: b["info"]["repository"]["size"].as_u64().unwrap_or(0),
                });
            }
        }
        list.sort_by_key(|b| b.stopped);
        Ok(list)
    }

    /// The archived WAL range of `repo`: `(min, max)` segment names, from pgBackRest.
    fn archive_range(&self, repo: u8) -> Result<Option<(String, String, String)>, OpsError> {
        let out = self.run(&["info", "--output=json"], &|_| {})?;
        let v: Value = serde_json::from_str(&out).map_err(|e| err("pgbackrest info", e))?;
        let mut best: Option<(String, String, String)> = None;
        for stanza in v.as_array().into_iter().flatten() {
            for a in stanza["archive"].as_array().into_iter().flatten() {
                if a["database"]["repo-key"].as_u64() != Some(repo as u64) {
                    continue;
                }
                let (Some(min), Some(max), Some(id)) =
                    (a["min"].as_str(), a["max"].as_str(), a["id"].as_str())
                else {
                    continue;
                };
                // The newest database (after an upgrade) is the one that matters.
                if best
                    .as_ref()
                    .is_none_or(|(_, m, _)| wal_position(max) > wal_position(m))
                {
                    best = Some((min.to_string(), max.to_string(), id.to_string()));
                }
            }
        }
        Ok(best)
    }

    /// The oldest and newest archived WAL segments of `repo`.
    pub fn archived_wal(&self, repo: u8) -> Result<Option<(String, String)>, OpsError> {
        Ok(self.archive_range(repo)?.map(|(min, max, _)| (min, max)))
    }

    /// When WAL segment `segment` reached a posix repository (its file's mtime).
    fn archived_at(&self, repo: u8, archive_id: &str, segment: &str) -> Option<DateTime<Utc>> {
        let root = self.local_repo_dir(repo)?;
        let dir = root
            .join("archive")
            .join(STANZA)
            .join(archive_id)
            .join(segment.get(..16)?);
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(segment))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
            .map(DateTime::<Utc>::from)
    }

    /// The recoverable window of `repo` (see [`Window`]), or `None` without a restorable
    /// backup there.
    pub fn window(&self, repo: u8) -> Result<Option<Window>, OpsError> {
        let list = self.list()?;
        let range = self.archive_range(repo)?;
        let oldest = list
            .iter()
            .filter(|b| b.repo == repo)
            .filter(|b| {
                // Restorable only while the WAL from its start is archived.
                range
                    .as_ref()
                    .is_none_or(|(min, _, _)| wal_position(&b.wal_start) >= wal_position(min))
            })
            .min_by_key(|b| b.stopped);
        Ok(oldest.map(|b| Window {
            repo,
            earliest: b.stopped,
            earliest_lsn: b.lsn_stop.clone(),
            latest_wal: range.as_ref().map(|(_, max, _)| max.clone()),
            latest: range
                .as_ref()
                .and_then(|(_, max, id)| self.archived_at(repo, id, max)),
        }))
    }

    /// Expires archived WAL of repo1 to the policy's window in time: keeps the WAL of every
    /// full backup that ended inside the last `pitr_days`, and of the newest one that ended
    /// before (the window starts on it), however many fulls were taken.
    pub fn expire_wal(&self, now: DateTime<Utc>, progress: &dyn Fn(&str)) -> Result<u32, OpsError> {
        let start = now - chrono::Duration::days(self.policy.pitr_days.into());
        let fulls: Vec<BackupInfo> = self
            .list()?
            .into_iter()
            .filter(|b| b.repo == 1 && b.kind == "full")
            .collect();
        let inside = fulls.iter().filter(|b| b.stopped >= start).count() as u32;
        let before = u32::from(fulls.iter().any(|b| b.stopped < start));
        let keep = (inside + before).max(1);
        self.run(
            &[
                "expire",
                "--repo=1",
                &format!("--repo1-retention-archive={keep}"),
            ],
            progress,
        )?;
        Ok(keep)
    }

    /// What is due now under the policy: `(repo, "full")` for each repository whose newest
    /// full backup is older than its interval (or which has none).
    pub fn due(&self, now: DateTime<Utc>) -> Result<Vec<(u8, &'static str)>, OpsError> {
        let list = self.list()?;
        let mut due = Vec::new();
        for (repo, every) in [
            (
                1u8,
                chrono::Duration::hours(self.policy.full_every_hours.into()),
            ),
            (
                2,
                chrono::Duration::days(self.policy.archive_every_days.into()),
            ),
        ] {
            let newest = list
                .iter()
                .filter(|b| b.repo == repo && b.kind == "full")
                .map(|b| b.started)
                .max();
            if newest.is_none_or(|t| now - t >= every) {
                due.push((repo, "full"));
            }
        }
        Ok(due)
    }

    /// Checks `target` against the window of `repo` (refused up front, naming the window,
    /// when outside it) and picks the backup set to restore from: the newest restorable
    /// backup that ends at or before the target.
    pub fn plan(&self, target: &Target, repo: u8) -> Result<Option<String>, OpsError> {
        let list: Vec<BackupInfo> = self
            .list()?
            .into_iter()
            .filter(|b| b.repo == repo)
            .collect();
        if list.is_empty() {
            return Err(err(
                "restore",
                format!(
                    "repo{repo} has no backup yet; take one with `dalp backup run --repo {repo}`"
                ),
            ));
        }
        let Some(w) = self.window(repo)? else {
            return Err(err(
                "restore",
                format!("no backup of repo{repo} can be restored: the WAL from their start was expired; take a full backup"),
            ));
        };
        let restorable: Vec<&BackupInfo> =
            list.iter().filter(|b| b.stopped >= w.earliest).collect();
        let refuse = |what: String| Err(err("restore target", format!("{what}; {}", w.describe())));
        match target {
            Target::Time(t) => {
                if *t < w.earliest {
                    return refuse(format!(
                        "{} is before the oldest restorable backup ended",
                        t.to_rfc3339()
                    ));
                }
                if *t > Utc::now() {
                    return refuse(format!("{} is in the future", t.to_rfc3339()));
                }
                if let Some(latest) = w.latest {
                    if *t > latest {
                        return refuse(format!(
                            "{} is after the newest archived WAL (what the archive lacks cannot be recovered)",
                            t.to_rfc3339()
                        ));
                    }
                }
                Ok(restorable
                    .iter()
                    .rev()
                    .find(|b| b.stopped <= *t)
                    .map(|b| b.label.clone()))
            }
            Target::Lsn(l) => {
                let want = lsn_value(l)
                    .ok_or_else(|| err("restore target", format!("`{l}` is not an LSN (X/Y)")))?;
                if want < lsn_value(&w.earliest_lsn).unwrap_or(0) {
                    return refuse(format!(
                        "LSN {l} is before the oldest restorable backup ended"
                    ));
                }
                if let Some(end) = w.latest_wal.as_deref().and_then(segment_end) {
                    if want > end {
                        return refuse(format!("LSN {l} is after the newest archived WAL"));
                    }
                }
                Ok(restorable
                    .iter()
                    .rev()
                    .find(|b| lsn_value(&b.lsn_stop).is_some_and(|s| s <= want))
                    .map(|b| b.label.clone()))
            }
            Target::Name(_) | Target::Latest => Ok(restorable.last().map(|b| b.label.clone())),
        }
    }

    /// Restores into `into` (which must not exist or be empty, and is never a live data
    /// directory), recovering to `target` and promoting there. The copy does not archive.
    pub fn restore(
        &self,
        target: &Target,
        into: &Path,
        repo: u8,
        progress: &dyn Fn(&str),
    ) -> Result<PathBuf, OpsError> {
        for t in &self.targets {
            if std::fs::canonicalize(&t.data_dir).ok() == std::fs::canonicalize(into).ok()
                || into.starts_with(&t.data_dir)
            {
                return Err(err(
                    "restore",
                    format!(
                        "{} is a live data directory; restore into a new one",
                        into.display()
                    ),
                ));
            }
        }
        if into.exists()
            && std::fs::read_dir(into)
                .map_err(OpsError::io(format!("read {}", into.display())))?
                .next()
                .is_some()
        {
            return Err(err(
                "restore",
                format!(
                    "{} is not empty; dalp restores only into a new directory",
                    into.display()
                ),
            ));
        }
        std::fs::create_dir_all(into)
            .map_err(OpsError::io(format!("create {}", into.display())))?;
        self.user.chown(into)?;
        let pgdata = into.join("pgdata");
        self.restore_pgdata(target, &pgdata, repo, false, progress)?;
        Ok(pgdata)
    }

    /// Restores `repo` into `pgdata` (which must not exist yet), set up to recover to
    /// `target` and promote. `archiving`: the restored server keeps archiving (it replaces a
    /// lost instance and continues its archive on a new timeline); else it never archives
    /// (a copy beside a live source must not write into its archive).
    pub fn restore_pgdata(
        &self,
        target: &Target,
        pgdata: &Path,
        repo: u8,
        archiving: bool,
        progress: &dyn Fn(&str),
    ) -> Result<(), OpsError> {
        if pgdata.exists() {
            return Err(err(
                "restore",
                format!("{} exists; restore into a new directory", pgdata.display()),
            ));
        }
        let set = self.plan(target, repo)?;
        std::fs::create_dir_all(pgdata).map_err(OpsError::io("create pgdata"))?;
        std::fs::set_permissions(pgdata, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(OpsError::io("chmod pgdata"))?;
        self.user.chown(pgdata)?;
        let mut args = vec![
            "restore".to_string(),
            format!("--pg1-path={}", pgdata.display()),
            format!("--repo={repo}"),
            format!(
                "--archive-mode={}",
                if archiving { "preserve" } else { "off" }
            ),
        ];
        if let Some(set) = &set {
            args.push(format!("--set={set}"));
        }
        match target {
            Target::Time(t) => {
                args.push("--type=time".into());
                args.push(format!("--target={}", t.format("%Y-%m-%d %H:%M:%S%.6f+00")));
                args.push("--target-action=promote".into());
            }
            Target::Lsn(l) => {
                args.push("--type=lsn".into());
                args.push(format!("--target={l}"));
                args.push("--target-action=promote".into());
            }
            Target::Name(n) => {
                args.push("--type=name".into());
                args.push(format!("--target={n}"));
                args.push("--target-action=promote".into());
            }
            Target::Latest => args.push("--type=default".into()),
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&refs, progress)?;
        Ok(())
    }
}

/// pgBackRest for the instance in `dir`: an embedded instance (`dalp up`) or a local HA
/// cluster (`dalp cluster up`). Fails when that cluster does not archive.
pub fn for_dir(dir: &Path) -> Result<Backups, OpsError> {
    if !available() {
        return Err(err(
            format!("{PGBACKREST_BIN} not found"),
            "install Debian's pgbackrest package (scripts/deps.sh does)",
        ));
    }
    if crate::HaCluster::is_cluster_dir(dir) {
        return crate::HaCluster::open(dir)?.backups()?.ok_or_else(|| {
            err(
                format!("HA cluster in {}", dir.display()),
                "it was created with --no-archive; WAL is not archived",
            )
        });
    }
    let layout = crate::Layout::new(dir);
    // The server's data may be lost while the backup configuration (and a repository
    // beside it) survived: restoring from it is then exactly what is needed.
    if !layout.pgdata().join("PG_VERSION").exists()
        && !dir.join("backup").join("pgbackrest.conf").exists()
    {
        return Err(err(
            format!("no instance in {}", dir.display()),
            "neither a server nor a backup configuration is there; pass the --data-dir of `dalp up`, or restore the lost instance from its repository with `dalp restore --keys BUNDLE --into DIR`",
        ));
    }
    embedded_backups(&layout)
}

/// Starts an embedded instance with continuous WAL archiving to pgBackRest: writes the
/// configuration (the archive command needs it), starts the server, creates the stanza.
pub async fn start_archiving(
    instance: crate::Instance,
    mut opts: crate::StartOptions,
) -> Result<crate::RunningCluster, OpsError> {
    let before = embedded_backups(instance.layout())?;
    before.write_config()?;
    opts.archive_command = Some(before.archive_command());
    opts.archive_timeout_secs = Some(before.policy().rpo_secs);
    let cluster = instance.start(opts).await?;
    // Now the port is known: pgBackRest reaches the server through its socket.
    let b = embedded_backups(cluster.layout())?;
    b.write_config()?;
    b.stanza_create()?;
    if let Some(dir) = b.policy().wal_receiver_dir.clone() {
        crate::walreceiver::WalReceiver::start(&cluster, b, &dir, Duration::from_secs(60)).await?;
    }
    Ok(cluster)
}

/// pgBackRest for an embedded instance's layout (policy from `DIR/backup.toml`).
pub fn embedded_backups(layout: &crate::Layout) -> Result<Backups, OpsError> {
    let policy = Policy::load(&layout.root().join("backup.toml"))?;
    Backups::new(
        &layout.root().join("backup"),
        policy,
        vec![PgTarget {
            data_dir: layout.pgdata(),
            socket_dir: layout.socket_dir(),
            port: layout.port(),
            host: None,
        }],
    )
}

/// A restored copy running on its own port. Stopped when dropped unless detached.
pub struct RestoredServer {
    pub data_dir: PathBuf,
    pub port: u16,
    socket_dir: PathBuf,
    child: Mutex<Option<Child>>,
}

/// What a restore recovered.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    /// Commit time of the last transaction replayed.
    pub last_transaction: Option<DateTime<Utc>>,
    /// WAL position the copy started its new timeline at.
    pub lsn: String,
    pub timeline: i32,
}

impl RestoredServer {
    /// Starts the restored copy in `into` (as restored by [`Backups::restore`]) on a free
    /// port, loopback only, without archiving or synchronous replication, and waits until
    /// recovery has finished and it was promoted. `detach`: it outlives this process.
    pub async fn start(
        into: &Path,
        bin: &Path,
        detach: bool,
        timeout: Duration,
    ) -> Result<RestoredServer, OpsError> {
        Self::start_with(into, bin, detach, timeout, &[]).await
    }

    /// [`RestoredServer::start`] with `settings` over the copy's own (e.g. archiving on
    /// for a restore that replaces a lost instance).
    pub async fn start_with(
        into: &Path,
        bin: &Path,
        detach: bool,
        timeout: Duration,
        settings: &[(&str, String)],
    ) -> Result<RestoredServer, OpsError> {
        let user = ServerUser::resolve()?;
        let data_dir = into.join("pgdata");
        let socket_dir = into.join("run");
        let log_dir = into.join("log");
        for d in [&socket_dir, &log_dir] {
            std::fs::create_dir_all(d).map_err(OpsError::io(format!("create {}", d.display())))?;
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(OpsError::io("chmod"))?;
            user.chown(d)?;
        }
        let port = crate::embedded::free_port()?;
        let log = log_dir.join("postgres.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(OpsError::io("open log"))?;
        let errf = out.try_clone().map_err(OpsError::io("open log"))?;
        user.chown(&log)?;
        // Patroni's standby settings must not make the copy follow anything.
        let _ = std::fs::remove_file(data_dir.join("standby.signal"));
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data_dir)
            .args(["-c", &format!("port={port}")])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", socket_dir.display()),
            ])
            .args(["-c", &format!("log_directory={}", log_dir.display())])
            .args(["-c", "archive_mode=off"])
            .args(["-c", "synchronous_standby_names="])
            .args(["-c", "hot_standby=on"]);
        for (k, v) in settings {
            cmd.args(["-c", &format!("{k}={v}")]);
        }
        cmd.current_dir(into)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(errf);
        if detach {
            user.configure_daemon(&mut cmd);
        } else {
            user.configure(&mut cmd);
        }
        let child = process::spawn(cmd).map_err(OpsError::io("start the restored copy"))?;
        let server = RestoredServer {
            data_dir,
            port,
            socket_dir,
            child: Mutex::new(Some(child)),
        };
        server.wait_promoted(timeout, &log).await?;
        if detach {
            // Leave it running; it is stopped with `pg_ctl stop` or by pid.
            server
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        Ok(server)
    }

    /// The copy's Unix socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The superuser on the copy's local socket.
    pub fn superuser_options(&self, dbname: &str) -> ConnectOptions {
        crate::embedded::socket_superuser(&self.socket_dir, self.port, dbname)
    }

    async fn wait_promoted(&self, timeout: Duration, log: &Path) -> Result<(), OpsError> {
        let deadline = Instant::now() + timeout;
        let opts = self.superuser_options("postgres");
        loop {
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let tail = || process::log_tail(log, 12);
            if let Some(status) = exited {
                // The server's own reason, e.g. "recovery ended before configured recovery
                // target was reached" for a target past the archived WAL.
                let why = process::last_fatal(log)
                    .map(|f| format!(": {f}"))
                    .unwrap_or_default();
                return Err(OpsError::StartFailed {
                    reason: format!("the restored copy stopped during recovery ({status}){why}"),
                    log: log.to_path_buf(),
                    tail: tail(),
                });
            }
            if let Ok(c) = opts.connect().await {
                if let Ok(row) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !row.get::<_, bool>(0) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(OpsError::StartFailed {
                    reason: format!("recovery did not finish within {timeout:?}"),
                    log: log.to_path_buf(),
                    tail: tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the copy recovered.
    pub async fn recovered(&self) -> Result<Recovered, OpsError> {
        let c = self
            .superuser_options("postgres")
            .connect()
            .await
            .map_err(|e| err("connect to the restored copy", e))?;
        let row = c
            .query_one(
                "SELECT pg_last_xact_replay_timestamp(), pg_current_wal_lsn()::text, timeline_id FROM pg_control_checkpoint()",
                &[],
            )
            .await
            .map_err(|e| err("query the restored copy", e))?;
        Ok(Recovered {
            last_transaction: row.get(0),
            lsn: row.get(1),
            timeline: row.get(2),
        })
    }

    /// Fast shutdown of the copy (if this value started it and did not detach).
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = process::stop_child(&mut c, Signal::SIGINT, Duration::from_secs(60));
        }
    }
}

impl Drop for RestoredServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rpo_is_validated_and_read_from_the_policy_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.toml");
        assert_eq!(Policy::load(&path).unwrap().rpo_secs, 60, "default");
        std::fs::write(&path, "rpo_secs = 5\n").unwrap();
        assert_eq!(Policy::load(&path).unwrap().rpo_secs, 5);
        for bad in ["rpo_secs = 0\n", "rpo_secs = 7200\n"] {
            std::fs::write(&path, bad).unwrap();
            let e = Policy::load(&path).unwrap_err().to_string();
            assert!(e.contains("rpo_secs"), "{e}");
        }
        let conf = |secs| {
            crate::embedded::server_settings(&crate::embedded::ServerConf {
                bin: Path::new("/nonexistent/bin"),
                socket_dir: Path::new("/run"),
                tls_dir: Path::new("/tls"),
                log_dir: Path::new("/log"),
                pgaudit_log: "write",
                slow_ms: 500,
                max_connections: 100,
                archive_command: Some("true"),
                archive_timeout_secs: secs,
            })
        };
        assert!(conf(5).contains(&("archive_timeout", "5s".to_string())));
    }
}
