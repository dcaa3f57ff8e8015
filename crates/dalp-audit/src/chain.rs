//! The hash chain: canonical event hashes, Merkle roots, batch hashes, and the Ed25519 key
//! that signs every batch head. Shared by the sealer and the verifier so both compute the
//! same bytes.

use std::path::Path;

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::Row;

/// Columns read for hashing, in this order, by sealer and verifier alike.
pub(crate) const EVENT_COLUMNS: &str =
    "id, occurred_at, txid::text, actor, organisation_id::text, action, \
     resource_type, resource_id, outcome, request_id, source_ip::text, details::text";

/// SHA-256 of the canonical JSON array of an event's columns (jsonb prints canonically).
pub(crate) fn event_hash(row: &Row) -> [u8; 32] {
    let at: DateTime<Utc> = row.get(1);
    let canonical = serde_json::json!([
        row.get::<_, i64>(0),
        at.timestamp_micros(),
        row.get::<_, String>(2),
        row.get::<_, String>(3),
        row.get::<_, Option<String>>(4),
        row.get::<_, String>(5),
        row.get::<_, String>(6),
        row.get::<_, Option<String>>(7),
        row.get::<_, String>(8),
        row.get::<_, Option<String>>(9),
        row.get::<_, Option<String>>(10),
        row.get::<_, String>(11),
    ]);
    Sha256::digest(canonical.to_string().as_bytes()).into()
}

/// Merkle root with domain separation (0x00 leaves, 0x01 nodes); an odd node is promoted.
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.is_empty() {
        return [0u8; 32];
    }
    let mut level: Vec<[u8; 32]> = leaves
        .iter()
        .map(|l| {
            Sha256::new()
                .chain_update([0u8])
                .chain_update(l)
                .finalize()
                .into()
        })
        .collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => Sha256::new()
                    .chain_update([1u8])
                    .chain_update(a)
                    .chain_update(b)
                    .finalize()
                    .into(),
                [a] => *a,
                _ => unreachable!(),
            })
            .collect();
    }
    level[0]
}

/// The key a rotation batch hands over to: its id and public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextKey {
    pub key_id: String,
    pub public: Vec<u8>,
}

/// What a batch commits to (a rotation batch also to the next key; batches without one
/// hash exactly as before rotation existed).
pub fn batch_hash(
    prev_hash: &[u8],
    batch_no: i64,
    first_seq: i64,
    last_seq: i64,
    merkle_root: &[u8],
    xmin_upper: u64,
    next_key: Option<&NextKey>,
) -> [u8; 32] {
    let mut h = Sha256::new()
        .chain_update(prev_hash)
        .chain_update(batch_no.to_be_bytes())
        .chain_update(first_seq.to_be_bytes())
        .chain_update(last_seq.to_be_bytes())
        .chain_update(merkle_root)
        .chain_update(xmin_upper.to_be_bytes());
    if let Some(k) = next_key {
        h = h
            .chain_update(b"dalp-audit-next-key")
            .chain_update((k.key_id.len() as u64).to_be_bytes())
            .chain_update(k.key_id.as_bytes())
            .chain_update(&k.public);
    }
    h.finalize().into()
}

/// The public key a rotation batch names, if its id matches it.
pub fn next_public(next: &NextKey) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = next.public.as_slice().try_into().ok()?;
    let public = VerifyingKey::from_bytes(&bytes).ok()?;
    (key_id(&public) == next.key_id).then_some(public)
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("audit signing key {path}: {message}")]
    File { path: String, message: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    key_id: String,
    secret: String,
}

/// The public half, for verifiers: `{"key_id": …, "public": hex}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyFile {
    key_id: String,
    public: String,
}

/// The public keys a verifier trusts, by key id. Every batch names the key that signed it;
/// a batch signed by a key not in this set is refused, whatever its signature says.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: std::collections::HashMap<String, VerifyingKey>,
}

impl TrustedKeys {
    pub fn one(public: VerifyingKey) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add(public);
        t
    }

    pub fn add(&mut self, public: VerifyingKey) {
        self.keys.insert(key_id(&public), public);
    }

    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys.get(key_id)
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Loads a key file: a public key file, or a signing key file (only its public half is
    /// kept). The key id in the file must match the key.
    pub fn load(&mut self, path: &Path) -> Result<(), KeyError> {
        let err = |message: String| KeyError::File {
            path: path.display().to_string(),
            message,
        };
        if !path.exists() {
            return Err(err(
                "no such file: give a trusted audit key (public or signing) with --audit-key"
                    .into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        if let Ok(p) = serde_json::from_str::<PublicKeyFile>(&text) {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(&p.public, &mut bytes).map_err(|e| err(e.to_string()))?;
            let public = VerifyingKey::from_bytes(&bytes).map_err(|e| err(e.to_string()))?;
            if key_id(&public) != p.key_id {
                return Err(err("key_id does not match the key".into()));
            }
            self.add(public);
            return Ok(());
        }
        self.add(AuditKey::open(path)?.public());
        Ok(())
    }
}

/// The Ed25519 key that signs batch heads. Kept in a 0600 file outside the database, so
/// whoever can rewrite the database still cannot forge a signed head.
pub struct AuditKey {
    pub key_id: String,
    signing: SigningKey,
}

fn key_id(public: &VerifyingKey) -> String {
    format!(
        "ed25519:{}",
        &hex::encode(Sha256::digest(public.as_bytes()))[..16]
    )
}

impl AuditKey {
    /// Opens an existing key; never creates one (verifiers and sealers of an existing chain
    /// must not invent keys).
    pub fn open(path: &Path) -> Result<AuditKey, KeyError> {
        if !path.exists() {
            return Err(KeyError::File {
                path: path.display().to_string(),
                message: "no such file: restore the audit signing key from the key bundle (or give it with --audit-key)".into(),
            });
        }
        AuditKey::open_or_create(path)
    }

    pub fn open_or_create(path: &Path) -> Result<AuditKey, KeyError> {
        let err = |message: String| KeyError::File {
            path: path.display().to_string(),
            message,
        };
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let kf: KeyFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
            let mut secret = [0u8; 32];
            hex::decode_to_slice(&kf.secret, &mut secret).map_err(|e| err(e.to_string()))?;
            let signing = SigningKey::from_bytes(&secret);
            if key_id(&signing.verifying_key()) != kf.key_id {
                return Err(err("key_id does not match the key".into()));
            }
            return Ok(AuditKey {
                key_id: kf.key_id,
                signing,
            });
        }
        let signing = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let kf = KeyFile {
            key_id: key_id(&signing.verifying_key()),
            secret: hex::encode(signing.to_bytes()),
        };
        dalp_db::secrets::write_private(
            path,
            &serde_json::to_string_pretty(&kf).expect("serialize"),
        )
        .map_err(|e| err(e.to_string()))?;
        Ok(AuditKey {
            key_id: kf.key_id,
            signing,
        })
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// This key as the next key of a rotation batch.
    pub fn as_next(&self) -> NextKey {
        NextKey {
            key_id: self.key_id.clone(),
            public: self.public().as_bytes().to_vec(),
        }
    }

    /// Writes the public half to `path` (0644), for verifiers that must not hold the
    /// signing key.
    pub fn write_public(&self, path: &Path) -> Result<(), KeyError> {
        let text = serde_json::to_string_pretty(&PublicKeyFile {
            key_id: self.key_id.clone(),
            public: hex::encode(self.public().as_bytes()),
        })
        .expect("serialize");
        std::fs::write(path, format!("{text}\n")).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.signing.sign(msg).to_bytes().to_vec()
    }
}

/// Whether `signature` over `msg` is valid under `public`.
pub fn signature_ok(public: &VerifyingKey, msg: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    public.verify(msg, &sig).is_ok()
}

/// A signed batch head, for anchoring outside the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub batch_no: i64,
    pub last_seq: i64,
    /// Hex.
    pub batch_hash: String,
    pub key_id: String,
    /// Hex Ed25519 signature over the batch hash.
    pub signature: String,
    pub sealed_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merkle_root_depends_on_order_and_content() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let c = [3u8; 32];
        let r = merkle_root(&[a, b, c]);
        assert_ne!(r, merkle_root(&[b, a, c]));
        assert_ne!(r, merkle_root(&[a, b]));
        assert_ne!(merkle_root(&[a]), a, "leaves are domain-separated");
    }

    #[test]
    fn key_roundtrip_and_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        let k = AuditKey::open_or_create(&p).unwrap();
        let again = AuditKey::open_or_create(&p).unwrap();
        assert_eq!(k.key_id, again.key_id);
        let sig = k.sign(b"head");
        assert!(signature_ok(&again.public(), b"head", &sig));
        assert!(!signature_ok(&again.public(), b"other", &sig));
        let other = AuditKey::open_or_create(&dir.path().join("other.json")).unwrap();
        assert!(!signature_ok(&other.public(), b"head", &sig));
    }

    #[test]
    fn trusted_keys_load_public_and_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let k = AuditKey::open_or_create(&dir.path().join("k.json")).unwrap();
        k.write_public(&dir.path().join("k.pub.json")).unwrap();
        let mut t = TrustedKeys::default();
        t.load(&dir.path().join("k.pub.json")).unwrap();
        assert_eq!(t.ids(), vec![k.key_id.clone()]);
        assert_eq!(t.get(&k.key_id), Some(&k.public()));
        let other = AuditKey::open_or_create(&dir.path().join("o.json")).unwrap();
        t.load(&dir.path().join("o.json")).unwrap();
        assert_eq!(t.ids().len(), 2);
        // A public file whose id was edited is refused.
        let text = std::fs::read_to_string(dir.path().join("k.pub.json")).unwrap();
        std::fs::write(
            dir.path().join("bad.json"),
            text.replace(&k.key_id, &other.key_id),
        )
        .unwrap();
        assert!(TrustedKeys::default()
            .load(&dir.path().join("bad.json"))
            .is_err());
        assert!(AuditKey::open(&dir.path().join("missing.json")).is_err());
    }
}
