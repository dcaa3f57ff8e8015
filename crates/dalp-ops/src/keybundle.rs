//! The key bundle: what a restore needs besides the backup repository, for the disaster in
//! which the whole host is lost — role passwords (`secrets.json`), the PII key-encryption
//! keys, the audit signing keys and their witness, the repositories' cipher passphrase
//! (`keys/`), the TLS CA and server certificate (`tls/`) and the backup policy
//! (`backup.toml`, which names the repositories).
//!
//! One file, sealed with AES-256-GCM under a key derived from a passphrase with Argon2id
//! (64 MiB, 3 passes): `{"format", "kdf", "salt", "nonce", "ciphertext"}` in JSON. Nothing in
//! it is readable without the passphrase, and a wrong passphrase or a changed byte is
//! refused (the tag does not verify). Keep it apart from the repository: together they are
//! the instance.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use data_encoding::BASE64;
use serde::{Deserialize, Serialize};

use crate::error::OpsError;
use crate::process::ServerUser;

pub const FORMAT: &str = "dalp-key-bundle/1";
/// What a bundle carries, relative to the data directory (directories whole).
pub const CONTENTS: &[&str] = &["secrets.json", "backup.toml", "keys", "tls"];
/// The shortest passphrase taken.
pub const MIN_PASSPHRASE: usize = 12;

const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_PASSES: u32 = 3;

fn err(context: impl Into<String>, message: impl std::fmt::Display) -> OpsError {
    OpsError::Bootstrap {
        context: context.into(),
        message: message.to_string(),
    }
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    format: String,
    kdf: String,
    memory_kib: u32,
    passes: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

#[derive(Serialize, Deserialize)]
struct File {
    mode: u32,
    /// Base64 of the content.
    data: String,
}

fn key(passphrase: &str, salt: &[u8], memory_kib: u32, passes: u32) -> Result<[u8; 32], OpsError> {
    let params = argon2::Params::new(memory_kib, passes, 1, Some(32))
        .map_err(|e| err("key bundle", format!("key derivation parameters: {e}")))?;
    let mut out = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut out)
        .map_err(|e| err("key bundle", format!("key derivation: {e}")))?;
    Ok(out)
}

fn collect(root: &Path, rel: &Path, out: &mut BTreeMap<String, File>) -> Result<(), OpsError> {
    let path = root.join(rel);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(OpsError::io(format!("read {}", path.display()))(e)),
    };
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .map_err(OpsError::io(format!("read {}", path.display())))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            collect(root, &rel.join(e.file_name()), out)?;
        }
    } else if meta.is_file() {
        let data =
            std::fs::read(&path).map_err(OpsError::io(format!("read {}", path.display())))?;
        out.insert(
            rel.to_string_lossy().into_owned(),
            File {
                mode: meta.permissions().mode() & 0o777,
                data: BASE64.encode(&data),
            },
        );
    }
    Ok(())
}

/// Seals the key material of the instance in `root` under `passphrase`. Returns the bundle
/// and the files it holds.
pub fn export(root: &Path, passphrase: &str) -> Result<(Vec<u8>, Vec<String>), OpsError> {
    if passphrase.chars().count() < MIN_PASSPHRASE {
        return Err(err(
            "key bundle",
            format!("the passphrase must have at least {MIN_PASSPHRASE} characters"),
        ));
    }
    if !root.join("secrets.json").exists() || !root.join("keys").is_dir() {
        return Err(err(
            format!("key bundle of {}", root.display()),
            "no instance there (secrets.json and keys/ are missing); pass the --data-dir of `dalp up`",
        ));
    }
    let mut files = BTreeMap::new();
    for c in CONTENTS {
        collect(root, Path::new(c), &mut files)?;
    }
    let names: Vec<String> = files.keys().cloned().collect();
    let plain = serde_json::to_vec(&files).expect("files serialise");
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 12] = rand::random();
    let k = key(passphrase, &salt, KDF_MEMORY_KIB, KDF_PASSES)?;
    let cipher = Aes256Gcm::new_from_slice(&k).expect("32-byte key");
    let ciphertext = cipher
        .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
        .map_err(|_| err("key bundle", "encryption failed"))?;
    let sealed = Sealed {
        format: FORMAT.into(),
        kdf: "argon2id".into(),
        memory_kib: KDF_MEMORY_KIB,
        passes: KDF_PASSES,
        salt: BASE64.encode(&salt),
        nonce: BASE64.encode(&nonce),
        ciphertext: BASE64.encode(&ciphertext),
    };
    Ok((
        serde_json::to_vec_pretty(&sealed).expect("bundle serialises"),
        names,
    ))
}

/// Opens `bundle` with `passphrase` and writes its files into the data directory `root`
/// (which must not hold any of them yet), with their modes; `tls/` is given to the server
/// user, as `dalp up` has it. Returns the paths written.
pub fn import(bundle: &[u8], passphrase: &str, root: &Path) -> Result<Vec<PathBuf>, OpsError> {
    let sealed: Sealed = serde_json::from_slice(bundle)
        .map_err(|e| err("key bundle", format!("not a dalp key bundle: {e}")))?;
    if sealed.format != FORMAT || sealed.kdf != "argon2id" {
        return Err(err(
            "key bundle",
            format!("format {} is not {FORMAT}", sealed.format),
        ));
    }
    let b64 = |s: &str| {
        BASE64
            .decode(s.as_bytes())
            .map_err(|e| err("key bundle", format!("damaged: {e}")))
    };
    let (salt, nonce, ciphertext) = (
        b64(&sealed.salt)?,
        b64(&sealed.nonce)?,
        b64(&sealed.ciphertext)?,
    );
    if nonce.len() != 12 || sealed.memory_kib > 4 * 1024 * 1024 || sealed.passes > 100 {
        return Err(err("key bundle", "damaged: bad parameters"));
    }
    let k = key(passphrase, &salt, sealed.memory_kib, sealed.passes)?;
    let plain = Aes256Gcm::new_from_slice(&k)
        .expect("32-byte key")
        .decrypt(Nonce::from_slice(&nonce), ciphertext.as_slice())
        .map_err(|_| {
            err(
                "key bundle",
                "the passphrase is wrong or the bundle was changed (it does not verify)",
            )
        })?;
    let files: BTreeMap<String, File> = serde_json::from_slice(&plain)
        .map_err(|e| err("key bundle", format!("damaged content: {e}")))?;
    for name in files.keys() {
        let p = Path::new(name);
        if p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(err("key bundle", format!("refuses the path {name}")));
        }
        if root.join(p).exists() {
            return Err(err(
                format!("key bundle into {}", root.display()),
                format!("{name} exists already; import into a new directory"),
            ));
        }
    }
    let user = ServerUser::resolve()?;
    std::fs::create_dir_all(root).map_err(OpsError::io(format!("create {}", root.display())))?;
    let mut written = Vec::new();
    for (name, f) in &files {
        let path = root.join(name);
        let parent = path.parent().expect("a file has a parent");
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(OpsError::io(format!("create {}", parent.display())))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .map_err(OpsError::io("chmod"))?;
        }
        let data = b64(&f.data)?;
        std::fs::write(&path, &data).map_err(OpsError::io(format!("write {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o777))
            .map_err(OpsError::io(format!("chmod {}", path.display())))?;
        written.push(path);
    }
    let tls = root.join("tls");
    if tls.is_dir() {
        std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o755))
            .map_err(OpsError::io("chmod tls"))?;
        user.chown(&tls)?;
        for p in written.iter().filter(|p| p.starts_with(&tls)) {
            user.chown(p)?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_opens_only_with_its_passphrase_and_unchanged() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("secrets.json"), b"{\"a\":1}").unwrap();
        std::fs::create_dir(src.path().join("keys")).unwrap();
        std::fs::write(src.path().join("keys/kek.json"), b"kek").unwrap();
        std::fs::set_permissions(
            src.path().join("keys/kek.json"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let (bundle, names) = export(src.path(), "correct horse battery").unwrap();
        assert_eq!(names, ["keys/kek.json", "secrets.json"]);
        assert!(!String::from_utf8_lossy(&bundle).contains("kek"));
        assert!(export(src.path(), "short").is_err());

        let dst = tempfile::tempdir().unwrap();
        let e = import(&bundle, "wrong horse battery", dst.path()).unwrap_err();
        assert!(e.to_string().contains("passphrase is wrong"), "{e}");
        let mut tampered: serde_json::Value = serde_json::from_slice(&bundle).unwrap();
        let mut ct = BASE64
            .decode(tampered["ciphertext"].as_str().unwrap().as_bytes())
            .unwrap();
        ct[3] ^= 1;
        tampered["ciphertext"] = BASE64.encode(&ct).into();
        assert!(import(
            &serde_json::to_vec(&tampered).unwrap(),
            "correct horse battery",
            dst.path()
        )
        .is_err());

        import(&bundle, "correct horse battery", dst.path()).unwrap();
        assert_eq!(
            std::fs::read(dst.path().join("keys/kek.json")).unwrap(),
            b"kek"
        );
        let mode = std::fs::metadata(dst.path().join("keys/kek.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Never over an existing instance.
        assert!(import(&bundle, "correct horse battery", dst.path()).is_err());
    }
}
