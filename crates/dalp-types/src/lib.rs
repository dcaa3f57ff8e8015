//! Domain values shared by more than one schema, each constructed only through a fallible
//! `parse`, so an invalid value never reaches SQL: EVM addresses (EIP-55), chain ids and
//! ISINs (with their check digit). Values owned by one domain live in that domain's crate.

use std::fmt;

use sha3::{Digest, Keccak256};

/// A validation failure: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Invalid {
        Invalid {
            field,
            message: message.into(),
        }
    }

    /// The same failure reported under another field name.
    pub fn for_field(mut self, field: &'static str) -> Invalid {
        self.field = field;
        self
    }
}

/// `0x` followed by lower-case hex: how bytes (hashes, addresses, calldata) leave dalp.
pub fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// `0x`-prefixed hex of any even length, as EVM tooling writes bytes.
pub fn parse_hex(field: &'static str, s: &str) -> Result<Vec<u8>, Invalid> {
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| Invalid::new(field, "must start with 0x"))?;
    hex::decode(digits)
        .map_err(|_| Invalid::new(field, "is not an even number of hex digits after 0x"))
}

/// An EVM address; mixed case must carry a valid EIP-55 checksum. Stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EvmAddress([u8; 20]);

impl EvmAddress {
    pub fn parse(s: &str) -> Result<EvmAddress, Invalid> {
        let field = "address";
        let hex_part = s
            .strip_prefix("0x")
            .ok_or_else(|| Invalid::new(field, "must start with 0x"))?;
        if hex_part.len() != 40 || !hex_part.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Invalid::new(field, "must be 0x followed by 40 hex digits"));
        }
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| Invalid::new(field, "is not hex"))?;
        let addr = EvmAddress(bytes);
        let mixed = hex_part.chars().any(|c| c.is_ascii_uppercase())
            && hex_part.chars().any(|c| c.is_ascii_lowercase());
        if mixed && addr.checksummed()[2..] != *hex_part {
            return Err(Invalid::new(field, "has an invalid EIP-55 checksum"));
        }
        Ok(addr)
    }

    /// EIP-55 mixed-case form.
    pub fn checksummed(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = Keccak256::digest(lower.as_bytes());
        let mut out = String::from("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0xf;
            out.push(if c.is_ascii_alphabetic() && nibble >= 8 {
                c.to_ascii_uppercase()
            } else {
                c
            });
        }
        out
    }

    /// Lower-case form, as stored.
    pub fn lower(&self) -> String {
        hex0x(&self.0)
    }

    pub fn bytes(&self) -> &[u8; 20] {
        &self.0
    }
}

impl fmt::Display for EvmAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.checksummed())
    }
}

/// An EVM chain id (positive, fits PostgreSQL bigint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainId(i64);

impl ChainId {
    pub fn parse(v: i64) -> Result<ChainId, Invalid> {
        if v <= 0 {
            return Err(Invalid::new("chain_id", "must be a positive integer"));
        }
        Ok(ChainId(v))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

/// An International Securities Identification Number (ISO 6166): two letters, nine
/// alphanumerics, and a Luhn check digit over the letters-as-numbers expansion.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Isin(String);

impl Isin {
    pub fn parse(s: &str) -> Result<Isin, Invalid> {
        let field = "isin";
        let s = s.trim().to_ascii_uppercase();
        if s.len() != 12 {
            return Err(Invalid::new(field, "must be 12 characters"));
        }
        let b = s.as_bytes();
        if !b[..2].iter().all(u8::is_ascii_uppercase) {
            return Err(Invalid::new(
                field,
                "must start with a two-letter country code",
            ));
        }
        if !b[2..11].iter().all(u8::is_ascii_alphanumeric) {
            return Err(Invalid::new(
                field,
                "characters 3 to 11 must be letters or digits",
            ));
        }
        if !b[11].is_ascii_digit() {
            return Err(Invalid::new(field, "must end with a check digit"));
        }
        // Letters become two digits (A=10 … Z=35); then Luhn over the whole digit string.
        let digits: Vec<u32> = b
            .iter()
            .flat_map(|c| {
                let v = if c.is_ascii_digit() {
                    (c - b'0') as u32
                } else {
                    (c - b'A') as u32 + 10
                };
                if v >= 10 {
                    vec![v / 10, v % 10]
                } else {
                    vec![v]
                }
            })
            .collect();
        let sum: u32 = digits
            .iter()
            .rev()
            .enumerate()
            .map(|(i, d)| {
                if i % 2 == 1 {
                    let x = d * 2;
                    if x > 9 {
                        x - 9
                    } else {
                        x
                    }
                } else {
                    *d
                }
            })
            .sum();
        if sum % 10 != 0 {
            return Err(Invalid::new(field, "check digit does not match"));
        }
        Ok(Isin(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A URL-safe identifier as the schemas' CHECKs define it: a lower-case letter or digit,
/// then up to 62 lower-case letters, digits or dashes.
pub fn parse_slug(field: &'static str, s: &str) -> Result<String, Invalid> {
    let ok = (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-');
    if !ok {
        return Err(Invalid::new(
            field,
            "must be 1 to 63 lower-case letters, digits and dashes, not starting with a dash",
        ));
    }
    Ok(s.to_string())
}

/// A country as ISO 3166-1 knows it (the list comes from the `isocountry` crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Country(isocountry::CountryCode);

impl Country {
    /// From the numeric code, e.g. 442 for Luxembourg.
    pub fn from_numeric(field: &'static str, code: i64) -> Result<Country, Invalid> {
        u32::try_from(code)
            .ok()
            .and_then(|c| isocountry::CountryCode::for_id(c).ok())
            .map(Country)
            .ok_or_else(|| {
                Invalid::new(
                    field,
                    format!("{code} is not an ISO 3166-1 numeric country code"),
                )
            })
    }

    /// From the two-letter code, e.g. LU.
    pub fn from_alpha2(field: &'static str, code: &str) -> Result<Country, Invalid> {
        isocountry::CountryCode::for_alpha2(code)
            .map(Country)
            .map_err(|_| {
                Invalid::new(
                    field,
                    format!("`{code}` is not an ISO 3166-1 alpha-2 country code, e.g. DE"),
                )
            })
    }

    pub fn numeric(self) -> u32 {
        self.0.numeric_id()
    }
}

/// An exact, non-negative decimal as PostgreSQL `numeric` text (never a float): up to
/// `int_digits` digits before the point and `frac_digits` after. Kept as normalised text
/// and bound as `$n::numeric`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Decimal(String);

impl Decimal {
    pub fn parse(
        field: &'static str,
        s: &str,
        int_digits: usize,
        frac_digits: usize,
    ) -> Result<Decimal, Invalid> {
        let s = s.trim();
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || (s.contains('.') && frac.is_empty())
        {
            return Err(Invalid::new(
                field,
                "must be a decimal number like 1.2345 (no sign, exponent or separators)",
            ));
        }
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        if int.len() > int_digits {
            return Err(Invalid::new(
                field,
                format!("has more than {int_digits} digits before the point"),
            ));
        }
        if frac.len() > frac_digits {
            return Err(Invalid::new(
                field,
                format!("has more than {frac_digits} digits after the point"),
            ));
        }
        let int = if int.is_empty() { "0" } else { int };
        Ok(Decimal(if frac.is_empty() {
            int.to_string()
        } else {
            format!("{int}.{frac}")
        }))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == "0"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The one check for names and labels before they reach SQL: trimmed, 1 to `max` characters
/// (as the column's `CHECK (length(..) BETWEEN 1 AND max)` counts them), no control
/// characters (U+0000 included, which PostgreSQL text cannot hold). [`TEXT_PATTERN`] says
/// the same in the OpenAPI document.
pub fn parse_text(field: &'static str, s: &str, max: usize) -> Result<String, Invalid> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > max {
        return Err(Invalid::new(
            field,
            format!("must be 1 to {max} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(s.to_string())
}

/// The JSON Schema `pattern` of a name or label as the validators take it: no control
/// characters (`char::is_control`, U+0000 included, which PostgreSQL text cannot hold) and no
/// white space at either end (values are trimmed, so a blank one is empty). The OpenAPI
/// document states it for every such field, with the column's length bound.
pub const TEXT_PATTERN: &str = r"^[^\s\u0000-\u001f\u007f-\u009f](?:[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?$";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isins_with_valid_check_digits() {
        for good in [
            "US0378331005",
            "DE000BAY0017",
            "AU0000XVGZA3",
            "GB0002634946",
            "us0378331005",
        ] {
            assert!(Isin::parse(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("US0378331006", "check digit"),
            ("US037833100", "12 characters"),
            ("1S0378331005", "country"),
            ("US03783310-5", "letters or digits"),
            ("US037833100X", "check digit"),
        ] {
            let e = Isin::parse(bad).unwrap_err();
            assert!(e.message.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn evm_addresses_follow_eip55() {
        let good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
        let a = EvmAddress::parse(good).unwrap();
        assert_eq!(a.checksummed(), good);
        assert_eq!(a.lower(), good.to_lowercase());
        assert!(EvmAddress::parse("0x5aaeb6053F3E94C9b9A09f33669435E7Ef1BeAed").is_err());
        assert_eq!(
            EvmAddress::parse("0x12")
                .unwrap_err()
                .for_field("contract_address")
                .field,
            "contract_address"
        );
    }

    #[test]
    fn decimals_are_exact_and_bounded() {
        assert_eq!(
            Decimal::parse("rate", "001.2500", 20, 18).unwrap().as_str(),
            "1.25"
        );
        assert_eq!(
            Decimal::parse("rate", "0.000000000000000001", 20, 18)
                .unwrap()
                .as_str(),
            "0.000000000000000001"
        );
        assert!(Decimal::parse("rate", "0", 20, 18).unwrap().is_zero());
        for bad in [
            "",
            "-1",
            "1e5",
            "1,5",
            "1.",
            ".5",
            "NaN",
            "0.0000000000000000001",
            "123456789012345678901",
        ] {
            assert!(Decimal::parse("rate", bad, 20, 18).is_err(), "{bad}");
        }
    }

    #[test]
    fn slugs_match_the_schema_checks() {
        assert!(parse_slug("slug", "green-bond-2").is_ok());
        for bad in ["", "-x", "Upper", "a_b", &"x".repeat(64)] {
            assert!(parse_slug("slug", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn countries_come_from_iso_3166() {
        assert_eq!(
            Country::from_numeric("country", 442).unwrap().numeric(),
            442
        );
        assert_eq!(
            Country::from_alpha2("country", "LU").unwrap().numeric(),
            442
        );
        for bad in [0, 999, -4, 1000] {
            assert!(Country::from_numeric("country", bad).is_err(), "{bad}");
        }
        assert!(Country::from_alpha2("country", "XX").is_err());
        assert!(Country::from_alpha2("country", "lu").is_err());
    }

    #[test]
    fn chain_ids_are_positive() {
        assert!(ChainId::parse(1).is_ok());
        assert!(ChainId::parse(0).is_err());
    }
}
