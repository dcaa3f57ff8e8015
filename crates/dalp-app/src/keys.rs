//! The key files of an instance (in its keys directory, kept outside the database and backed
//! up as the key bundle) and how often the sealer runs and witnesses.

/// The PII key-encryption key.
pub const KEK_FILE: &str = "kek.json";
/// The audit chain's signing key.
pub const AUDIT_KEY_FILE: &str = "audit-ed25519.json";
/// The public half of the chain's first audit key: the verifiers' trust anchor (later keys
/// are trusted through rotation batches), for verifiers that must not hold a signing key.
pub const AUDIT_PUBLIC_KEY_FILE: &str = "audit-ed25519.pub.json";
/// The directory (inside the keys directory) where the sealer witnesses the signed chain
/// head.
pub const AUDIT_WITNESS_DIR: &str = "audit-witness";

/// The audit keys a verifier trusts for the keys directory `keys_dir`: the trust anchor
/// (the first key's public half) when it exists, else the signing key's public half.
/// Later keys are trusted through the chain's rotation batches.
pub fn trusted_audit_keys(
    keys_dir: &std::path::Path,
) -> Result<dalp_audit::TrustedKeys, dalp_audit::chain::KeyError> {
    let mut keys = dalp_audit::TrustedKeys::default();
    let anchor = keys_dir.join(AUDIT_PUBLIC_KEY_FILE);
    if anchor.exists() {
        keys.load(&anchor)?;
    } else {
        keys.load(&keys_dir.join(AUDIT_KEY_FILE))?;
    }
    Ok(keys)
}

/// How often the sealer witnesses the chain head (when it moved).
pub const WITNESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the sealer runs; keeps seal lag well under a second.
pub const SEAL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
