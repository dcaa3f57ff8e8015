//! TOTP (RFC 6238: HMAC-SHA1, 30-second steps, 6 digits) and one-time backup codes.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

pub const STEP_SECONDS: u64 = 30;
pub const DIGITS: u32 = 6;
/// Accept the previous and next step too, for clock drift.
pub const WINDOW: i64 = 1;

/// A fresh 160-bit secret.
pub fn generate_secret() -> [u8; 20] {
    rand::random()
}

/// Base32 form for authenticator apps.
pub fn secret_base32(secret: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(secret)
}

/// `otpauth://` URI for QR codes.
pub fn otpauth_uri(secret: &[u8], account: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    format!(
        "otpauth://totp/dalp:{}?secret={}&issuer=dalp&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        enc(account),
        secret_base32(secret)
    )
}

/// HOTP value for `counter` (RFC 4226) with `digits` digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = (h[19] & 0x0f) as usize;
    let bin = u32::from_be_bytes([
        h[offset] & 0x7f,
        h[offset + 1],
        h[offset + 2],
        h[offset + 3],
    ]);
    bin % 10u32.pow(digits)
}

/// The time step of a Unix time.
pub fn step_at(unix_seconds: u64) -> u64 {
    unix_seconds / STEP_SECONDS
}

/// The step whose code matches, within the drift window and strictly after `last_used_step`
/// (so a code is never accepted twice).
pub fn verify(secret: &[u8], code: &str, unix_seconds: u64, last_used_step: u64) -> Option<u64> {
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let want: u32 = code.parse().ok()?;
    let now = step_at(unix_seconds) as i64;
    (-WINDOW..=WINDOW)
        .map(|d| now + d)
        .filter(|s| *s > last_used_step as i64 && *s >= 0)
        .find(|s| hotp(secret, *s as u64, DIGITS) == want)
        .map(|s| s as u64)
}

/// Ten backup codes like `k3xq-9m2p-w7ha`, shown once.
pub fn generate_backup_codes() -> Vec<String> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    (0..10)
        .map(|_| {
            let raw: [u8; 12] = rand::random();
            raw.chunks(4)
                .map(|c| {
                    c.iter()
                        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join("-")
        })
        .collect()
}

/// Stored form of a backup code (codes carry ~60 bits of entropy, so a fast hash suffices).
pub fn hash_backup_code(code: &str) -> Vec<u8> {
    let normalised: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Sha256::digest(normalised.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        let secret = b"12345678901234567890";
        for (t, code) in [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(secret, step_at(t), 8), code, "t={t}");
        }
    }

    #[test]
    fn verify_accepts_window_and_refuses_replay() {
        let secret = generate_secret();
        let t = 1_700_000_000;
        let code = format!("{:06}", hotp(&secret, step_at(t), 6));
        let step = verify(&secret, &code, t, 0).unwrap();
        assert_eq!(step, step_at(t));
        assert!(verify(&secret, &code, t, step).is_none(), "replay accepted");
        assert!(
            verify(&secret, &code, t + 30, 0).is_some(),
            "one step of drift"
        );
        assert!(
            verify(&secret, &code, t + 90, 0).is_none(),
            "three steps late"
        );
        assert!(verify(&secret, "12345", t, 0).is_none());
        assert!(verify(&secret, "abcdef", t, 0).is_none());
    }

    #[test]
    fn backup_codes_hash_ignoring_format() {
        let codes = generate_backup_codes();
        assert_eq!(codes.len(), 10);
        let c = &codes[0];
        assert_eq!(
            hash_backup_code(c),
            hash_backup_code(&c.to_uppercase().replace('-', ""))
        );
    }
}
