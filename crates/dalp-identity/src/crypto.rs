//! Encryption at rest for PII: AES-256-GCM under per-record data keys (DEKs), each DEK stored
//! only wrapped by a key-encryption key (KEK) from a [`KeyProvider`]. The provider interface
//! is async and key-id based so a cloud KMS with customer-managed keys fits behind it; the
//! default [`FileKeyProvider`] keeps KEKs in a 0600 file under the data directory.
//! Rotation adds a KEK version and re-wraps DEKs; old versions stay until nothing uses them,
//! so every record stays readable throughout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key-encryption key {0} is not available")]
    UnknownKek(String),
    #[error("decryption failed: wrong key or tampered ciphertext")]
    Decrypt,
    #[error("key file {path}: {message}")]
    KeyFile { path: String, message: String },
}

/// A DEK wrapped by a KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_id: String,
    pub blob: Vec<u8>,
}

/// Where KEKs live. Implementations must never hand out the KEK itself.
pub trait KeyProvider: Send + Sync {
    /// The KEK new data keys are wrapped with.
    fn active_kek(&self) -> String;
    fn wrap<'a>(&'a self, dek: &'a [u8; 32]) -> BoxFuture<'a, Result<WrappedKey, CryptoError>>;
    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
    ) -> BoxFuture<'a, Result<[u8; 32], CryptoError>>;
    /// Creates a new KEK version, makes it active and returns its id.
    fn rotate(&self) -> BoxFuture<'_, Result<String, CryptoError>>;
}

/// AES-256-GCM with a random 96-bit nonce; output is `nonce || ciphertext || tag`.
pub fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let nonce: [u8; 12] = rand::random();
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption cannot fail for in-memory buffers");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    out
}

/// Reverses [`seal`]; fails on a wrong key, wrong `aad` or any modified byte.
pub fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < 12 + 16 {
        return Err(CryptoError::Decrypt);
    }
    let (nonce, ct) = sealed.split_at(12);
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Decrypt)
}

/// A fresh random data key.
pub fn new_dek() -> [u8; 32] {
    rand::random()
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    active: String,
    /// KEK id → hex key.
    keys: BTreeMap<String, String>,
}

/// KEKs in a JSON file (mode 0600), created on first use.
pub struct FileKeyProvider {
    path: PathBuf,
    state: RwLock<KeyFile>,
}

impl FileKeyProvider {
    pub fn open_or_create(path: &Path) -> Result<FileKeyProvider, CryptoError> {
        let err = |message: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        let state = if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let kf: KeyFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
            if !kf.keys.contains_key(&kf.active) {
                return Err(err(format!("active key {} is not in the file", kf.active)));
            }
            kf
        } else {
            let mut kf = KeyFile::default();
            let id = new_kek_id();
            kf.keys.insert(id.clone(), hex::encode(new_dek()));
            kf.active = id;
            write_key_file(path, &kf).map_err(|e| err(e.to_string()))?;
            kf
        };
        Ok(FileKeyProvider {
            path: path.to_path_buf(),
            state: RwLock::new(state),
        })
    }

    fn kek(&self, id: &str) -> Result<[u8; 32], CryptoError> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let hex_key = state
            .keys
            .get(id)
            .ok_or_else(|| CryptoError::UnknownKek(id.to_string()))?;
        let mut k = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut k)
            .map_err(|_| CryptoError::UnknownKek(id.to_string()))?;
        Ok(k)
    }

    /// Re-reads the file (another process may have rotated).
    pub fn reload(&self) -> Result<(), CryptoError> {
        let fresh = FileKeyProvider::open_or_create(&self.path)?;
        let new_state = fresh.state.into_inner().unwrap_or_else(|e| e.into_inner());
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = new_state;
        Ok(())
    }
}

fn new_kek_id() -> String {
    format!(
        "file-{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        hex::encode(rand::random::<[u8; 3]>())
    )
}

fn write_key_file(path: &Path, kf: &KeyFile) -> std::io::Result<()> {
    dalp_db::secrets::write_private(path, &serde_json::to_string_pretty(kf).expect("serialize"))
}

impl KeyProvider for FileKeyProvider {
    fn active_kek(&self) -> String {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .active
            .clone()
    }

    fn wrap<'a>(&'a self, dek: &'a [u8; 32]) -> BoxFuture<'a, Result<WrappedKey, CryptoError>> {
        Box::pin(async move {
            let kek_id = self.active_kek();
            let kek = self.kek(&kek_id)?;
            Ok(WrappedKey {
                blob: seal(&kek, dek, kek_id.as_bytes()),
                kek_id,
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
    ) -> BoxFuture<'a, Result<[u8; 32], CryptoError>> {
        Box::pin(async move {
            let kek = match self.kek(&wrapped.kek_id) {
                Ok(k) => k,
                Err(CryptoError::UnknownKek(_)) => {
                    // Another process may have rotated since we loaded the file.
                    self.reload()?;
                    self.kek(&wrapped.kek_id)?
                }
                Err(e) => return Err(e),
            };
            let dek = open(&kek, &wrapped.blob, wrapped.kek_id.as_bytes())?;
            dek.try_into().map_err(|_| CryptoError::Decrypt)
        })
    }

    fn rotate(&self) -> BoxFuture<'_, Result<String, CryptoError>> {
        Box::pin(async move {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            let id = new_kek_id();
            state.keys.insert(id.clone(), hex::encode(new_dek()));
            state.active = id.clone();
            write_key_file(&self.path, &state).map_err(|e| CryptoError::KeyFile {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?;
            Ok(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_tamper_detection() {
        let k = new_dek();
        let s = seal(&k, b"secret", b"row-1");
        assert_eq!(open(&k, &s, b"row-1").unwrap(), b"secret");
        assert!(
            open(&k, &s, b"row-2").is_err(),
            "ciphertext moved to another row"
        );
        let mut t = s.clone();
        t[14] ^= 1;
        assert!(open(&k, &t, b"row-1").is_err());
        assert!(open(&new_dek(), &s, b"row-1").is_err());
    }

    #[tokio::test]
    async fn file_provider_rotates_and_keeps_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/kek.json");
        let p = FileKeyProvider::open_or_create(&path).unwrap();
        let dek = new_dek();
        let w1 = p.wrap(&dek).await.unwrap();
        let first = p.active_kek();
        let second = p.rotate().await.unwrap();
        assert_ne!(first, second);
        assert_eq!(p.unwrap(&w1).await.unwrap(), dek);
        let w2 = p.wrap(&dek).await.unwrap();
        assert_eq!(w2.kek_id, second);
        // A second process sees the rotation.
        let again = FileKeyProvider::open_or_create(&path).unwrap();
        assert_eq!(again.active_kek(), second);
        assert_eq!(again.unwrap(&w2).await.unwrap(), dek);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
