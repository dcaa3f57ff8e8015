//! Domain values, constructed only through `parse`, so invalid input never reaches SQL.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use dalp_types::{EvmAddress, Invalid};

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid::new(field, message)
}

/// A lower-cased e-mail address of plausible shape (no full RFC 5322; delivery proves the rest).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Email(String);

impl Email {
    pub fn parse(s: &str) -> Result<Email, Invalid> {
        let s = s.trim().to_lowercase();
        if s.len() > 254 {
            return Err(invalid("email", "longer than 254 characters"));
        }
        let (local, domain) = s
            .split_once('@')
            .ok_or_else(|| invalid("email", "must contain @"))?;
        let ok_chars = |p: &str, extra: &str| {
            p.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
        };
        if local.is_empty()
            || local.len() > 64
            || !ok_chars(local, ".!#$%&*+/=?^_`{|}~-")
            || domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
            || !ok_chars(domain, ".-")
        {
            return Err(invalid("email", "is not a valid address"));
        }
        Ok(Email(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password as typed: 12 to 256 characters.
#[derive(Clone)]
pub struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl Password {
    pub fn parse(s: &str) -> Result<Password, Invalid> {
        let n = s.chars().count();
        if n < 12 {
            return Err(invalid("password", "must be at least 12 characters"));
        }
        if n > 256 {
            return Err(invalid("password", "must be at most 256 characters"));
        }
        Ok(Password(s.to_string()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Longest user or organisation name: the `CHECK (length(name) BETWEEN 1 AND 200)` of
/// their tables (a test compares the two).
pub const NAME_MAX_CHARS: usize = 200;
/// Longest API-key name: the `CHECK (length(name) BETWEEN 1 AND 100)` of `api_keys`.
pub const API_KEY_NAME_MAX_CHARS: usize = 100;

/// A display name: 1 to [`NAME_MAX_CHARS`] characters, no control characters.
pub fn parse_name(field: &'static str, s: &str) -> Result<String, Invalid> {
    parse_bounded_name(field, s, NAME_MAX_CHARS)
}

/// A name of 1 to `max` characters (as the column's CHECK counts them), no control
/// characters (U+0000 included, which PostgreSQL text cannot hold).
pub fn parse_bounded_name(field: &'static str, s: &str, max: usize) -> Result<String, Invalid> {
    dalp_types::parse_text(field, s, max)
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $field:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn parse(s: &str) -> Result<$name, Invalid> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(invalid($field, format!(
                        "must be one of: {}",
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_enum!(
    /// Platform-wide roles.
    PlatformRole, "role", {
    Admin => "admin",
    Auditor => "auditor",
    SystemManager => "systemManager",
    TokenManager => "tokenManager",
    ComplianceManager => "complianceManager",
    ClaimPolicyManager => "claimPolicyManager",
    ClaimIssuer => "claimIssuer",
    IdentityManager => "identityManager",
});

string_enum!(
    /// Roles inside an organisation.
    OrgRole, "role", {
    Owner => "owner",
    Admin => "admin",
    Member => "member",
});

string_enum!(
    /// What an API key may do.
    Scope, "scope", {
    Read => "read",
    ReadWrite => "read-write",
});

string_enum!(
    /// Tax residency of a KYC subject.
    ResidencyStatus, "residency_status", {
    Resident => "resident",
    NonResident => "non_resident",
    DualResident => "dual_resident",
    Unknown => "unknown",
});

/// KYC data; stored only encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KycProfile {
    #[schema(min_length = 1, max_length = 200)]
    pub first_name: String,
    #[schema(min_length = 1, max_length = 200)]
    pub last_name: String,
    /// ISO 8601 date, e.g. 1980-02-29.
    #[schema(format = Date)]
    pub date_of_birth: String,
    /// ISO 3166-1 alpha-2, upper case.
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: String,
    pub residency_status: ResidencyStatus,
    pub national_id: String,
}

impl KycProfile {
    pub fn validate(&self) -> Result<(), Invalid> {
        parse_name("first_name", &self.first_name)?;
        parse_name("last_name", &self.last_name)?;
        let dob = chrono::NaiveDate::parse_from_str(&self.date_of_birth, "%Y-%m-%d")
            .map_err(|_| invalid("date_of_birth", "must be a date YYYY-MM-DD"))?;
        let today = chrono::Utc::now().date_naive();
        if dob > today || dob < chrono::NaiveDate::from_ymd_opt(1900, 1, 1).expect("valid") {
            return Err(invalid("date_of_birth", "is out of range"));
        }
        dalp_types::Country::from_alpha2("country", &self.country)?;
        let id = self.national_id.trim();
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' ')
        {
            return Err(invalid(
                "national_id",
                "must be 1 to 64 letters, digits, spaces or dashes",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            Email::parse(" Alice@Example.COM ").unwrap().as_str(),
            "alice@example.com"
        );
        for bad in [
            "",
            "a",
            "a@b",
            "@x.io",
            "a@.io",
            "a@x..io",
            "a b@x.io",
            "x@x.io'; drop table users;--",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        assert!(Email::parse(&format!("{}@x.io", "a".repeat(65))).is_err());
    }

    #[test]
    fn enums_parse_exactly() {
        assert_eq!(
            PlatformRole::parse("identityManager").unwrap(),
            PlatformRole::IdentityManager
        );
        assert!(PlatformRole::parse("Admin").is_err());
        assert_eq!(Scope::parse("read-write").unwrap(), Scope::ReadWrite);
        let e = ResidencyStatus::parse("x").unwrap_err();
        assert!(e.message.contains("dual_resident"));
    }

    #[test]
    fn passwords_have_bounds_and_never_print() {
        assert!(Password::parse("short").is_err());
        assert!(Password::parse(&"x".repeat(257)).is_err());
        let p = Password::parse("correct horse battery").unwrap();
        assert!(!format!("{p:?}").contains("horse"));
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    /// The validators' bounds are the columns' CHECKs.
    #[test]
    fn name_bounds_match_the_table_checks() {
        let init = include_str!("../migrations/0001_init.sql");
        let access = include_str!("../migrations/0002_access.sql");
        let check = |n: usize| {
            format!("name       text        NOT NULL CHECK (length(name) BETWEEN 1 AND {n})")
        };
        assert_eq!(
            init.matches(&check(NAME_MAX_CHARS)).count(),
            2,
            "users and organisations"
        );
        let api_keys = &access[access.find("CREATE TABLE dalp_identity.api_keys").unwrap()..];
        assert!(api_keys.contains(&format!(
            "CHECK (length(name) BETWEEN 1 AND {API_KEY_NAME_MAX_CHARS})"
        )));
        assert!(parse_bounded_name(
            "name",
            &"k".repeat(API_KEY_NAME_MAX_CHARS),
            API_KEY_NAME_MAX_CHARS
        )
        .is_ok());
        let e = parse_bounded_name(
            "name",
            &"k".repeat(API_KEY_NAME_MAX_CHARS + 1),
            API_KEY_NAME_MAX_CHARS,
        )
        .unwrap_err();
        assert!(e.message.contains("1 to 100"), "{}", e.message);
        assert!(parse_name("name", "a\u{0}b").is_err());
    }
}
