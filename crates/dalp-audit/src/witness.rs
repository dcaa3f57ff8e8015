//! External witnesses of the chain: the sealer appends the signed chain head to a file
//! outside the database (`heads.jsonl`, one checkpoint per line, fsynced) at a fixed interval,
//! and verification checks the chain against every head ever witnessed. Whoever can rewrite
//! the database — truncate the chain's tail, wipe it, delete batches and let the sealer re-sign,
//! re-sign with another key — cannot make the chain match heads written before, so these are
//! detected without anyone having exported a checkpoint by hand. Keep the directory on storage
//! the database administrator cannot write (another host, a WORM bucket, a SIEM: the
//! forwarder ships the same heads as audit events are shipped).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::chain::Checkpoint;

/// The file of witnessed heads inside a witness directory.
pub const HEADS_FILE: &str = "heads.jsonl";
/// The head the last successful verification reached (where an incremental one starts).
pub const VERIFIED_FILE: &str = "verified.json";

#[derive(Debug, Clone)]
pub struct Witness {
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("witness {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("witness {path} line {line}: {message}")]
    Malformed {
        path: String,
        line: usize,
        message: String,
    },
}

impl Witness {
    pub fn new(dir: impl Into<PathBuf>) -> Witness {
        Witness { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join(HEADS_FILE)
    }

    fn io(&self, source: std::io::Error) -> WitnessError {
        WitnessError::Io {
            path: self.path().display().to_string(),
            source,
        }
    }

    /// Every head witnessed so far, oldest first (none when the file does not exist yet).
    pub fn heads(&self) -> Result<Vec<Checkpoint>, WitnessError> {
        let text = match std::fs::read_to_string(self.path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| WitnessError::Malformed {
                    path: self.path().display().to_string(),
                    line: i + 1,
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// The head the last successful verification reached, if one was recorded.
    pub fn verified(&self) -> Result<Option<Checkpoint>, WitnessError> {
        let path = self.dir.join(VERIFIED_FILE);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| WitnessError::Malformed {
                    path: path.display().to_string(),
                    line: 1,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Records `head` as verified (written to a temporary file, then renamed).
    pub fn record_verified(&self, head: &Checkpoint) -> Result<(), WitnessError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let tmp = self.dir.join(format!("{VERIFIED_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(head).expect("serialize"))
            .and_then(|_| std::fs::rename(&tmp, self.dir.join(VERIFIED_FILE)))
            .map_err(|e| self.io(e))
    }

    /// Appends `head` when it is newer than the last head witnessed; true when it did. The
    /// line is on disk (fsync) when this returns.
    pub fn append(&self, head: &Checkpoint) -> Result<bool, WitnessError> {
        if let Some(last) = self.heads()?.last() {
            if last.batch_no >= head.batch_no {
                return Ok(false);
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path())
            .map_err(|e| self.io(e))?;
        let line = serde_json::to_string(head).expect("serialize");
        f.write_all(format!("{line}\n").as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| self.io(e))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(batch_no: i64) -> Checkpoint {
        Checkpoint {
            batch_no,
            last_seq: batch_no * 10,
            batch_hash: "00".repeat(32),
            key_id: "ed25519:x".into(),
            signature: "00".repeat(64),
            sealed_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn appends_only_newer_heads_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let w = Witness::new(dir.path().join("w"));
        assert!(w.heads().unwrap().is_empty());
        assert!(w.append(&head(1)).unwrap());
        assert!(!w.append(&head(1)).unwrap());
        assert!(w.append(&head(3)).unwrap());
        assert!(!w.append(&head(2)).unwrap());
        let heads = w.heads().unwrap();
        assert_eq!(heads.iter().map(|h| h.batch_no).collect::<Vec<_>>(), [1, 3]);
        std::fs::write(dir.path().join("w").join(HEADS_FILE), "{oops\n").unwrap();
        assert!(matches!(
            w.heads(),
            Err(WitnessError::Malformed { line: 1, .. })
        ));
    }
}
