//! Asset values, parsed before they reach SQL; every failure names its field.

use dalp_types::{ChainId, EvmAddress, Invalid, Isin};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What kind of instrument an asset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseType {
    Bond,
    Equity,
    Fund,
    Stablecoin,
    Deposit,
    RealEstate,
    PreciousMetal,
}

impl BaseType {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseType::Bond => "bond",
            BaseType::Equity => "equity",
            BaseType::Fund => "fund",
            BaseType::Stablecoin => "stablecoin",
            BaseType::Deposit => "deposit",
            BaseType::RealEstate => "real_estate",
            BaseType::PreciousMetal => "precious_metal",
        }
    }
}

/// An asset as submitted, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetInput {
    pub organisation_id: Uuid,
    pub name: String,
    pub symbol: String,
    pub decimals: i64,
    pub base_type: BaseType,
    pub isin: Option<String>,
    pub country_numeric: Option<i64>,
    pub chain_id: Option<i64>,
    pub contract_address: Option<String>,
    /// A published template of the same base type; `metadata` is checked against it.
    #[serde(default)]
    pub template_id: Option<Uuid>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// A validated asset definition.
#[derive(Debug, Clone, PartialEq)]
pub struct AssetSpec {
    pub organisation_id: Uuid,
    pub name: String,
    pub symbol: String,
    pub decimals: i16,
    pub base_type: BaseType,
    pub isin: Option<Isin>,
    pub country_numeric: Option<i16>,
    pub contract: Option<(ChainId, EvmAddress)>,
    pub template_id: Option<Uuid>,
    pub metadata: serde_json::Value,
}

impl AssetInput {
    /// Validates every field; the first failure names its field.
    pub fn parse(self) -> Result<AssetSpec, Invalid> {
        let name = self.name.trim().to_string();
        if name.is_empty() || name.chars().count() > 50 || name.chars().any(char::is_control) {
            return Err(Invalid::new(
                "name",
                "must be 1 to 50 characters without control characters",
            ));
        }
        let symbol = self.symbol.trim().to_string();
        let ok_symbol = !symbol.is_empty()
            && symbol.len() <= 12
            && symbol
                .chars()
                .next()
                .map(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                .unwrap_or(false)
            && symbol
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '.' || c == '-');
        if !ok_symbol {
            return Err(Invalid::new(
                "symbol",
                "must be 1 to 12 upper-case letters, digits, '.' or '-'",
            ));
        }
        if !(0..=18).contains(&self.decimals) {
            return Err(Invalid::new("decimals", "must be 0 to 18"));
        }
        let isin = self.isin.as_deref().map(Isin::parse).transpose()?;
        let country_numeric = match self.country_numeric {
            None => None,
            Some(c) if (1..=999).contains(&c) => Some(c as i16),
            Some(_) => {
                return Err(Invalid::new(
                    "country_numeric",
                    "must be an ISO 3166-1 numeric code (1 to 999)",
                ))
            }
        };
        let contract = match (self.chain_id, self.contract_address.as_deref()) {
            (None, None) => None,
            (Some(c), Some(a)) => Some((
                ChainId::parse(c)?,
                EvmAddress::parse(a).map_err(|e| e.for_field("contract_address"))?,
            )),
            _ => {
                return Err(Invalid::new(
                    "contract_address",
                    "chain_id and contract_address go together",
                ))
            }
        };
        let metadata = self.metadata.unwrap_or_else(|| serde_json::json!({}));
        if !metadata.is_object() {
            return Err(Invalid::new("metadata", "must be an object"));
        }
        if self.template_id.is_none()
            && metadata.as_object().map(|m| !m.is_empty()).unwrap_or(false)
        {
            return Err(Invalid::new(
                "metadata",
                "needs a template_id that defines its fields",
            ));
        }
        Ok(AssetSpec {
            template_id: self.template_id,
            metadata,
            organisation_id: self.organisation_id,
            name,
            symbol,
            decimals: self.decimals as i16,
            base_type: self.base_type,
            isin,
            country_numeric,
            contract,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> AssetInput {
        AssetInput {
            organisation_id: Uuid::nil(),
            name: "Green Bond 2030".into(),
            symbol: "GB30".into(),
            decimals: 18,
            base_type: BaseType::Bond,
            isin: Some("US0378331005".into()),
            country_numeric: Some(442),
            chain_id: Some(1),
            contract_address: Some("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".into()),
            template_id: None,
            metadata: None,
        }
    }

    #[test]
    fn a_good_asset_parses_and_normalises_the_address() {
        let spec = input().parse().unwrap();
        assert_eq!(
            spec.contract.unwrap().1.lower(),
            "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = fn(&mut AssetInput);
        let cases: Vec<(Mutation, &str)> = vec![
            (|i| i.name = "x".repeat(51), "name"),
            (|i| i.symbol = "lower".into(), "symbol"),
            (|i| i.decimals = 19, "decimals"),
            (|i| i.decimals = -1, "decimals"),
            (|i| i.isin = Some("US0378331006".into()), "isin"),
            (|i| i.country_numeric = Some(1000), "country_numeric"),
            (
                |i| i.contract_address = Some("0x5aaeb6053F3E94C9b9A09f33669435E7Ef1BeAed".into()),
                "contract_address",
            ),
            (|i| i.chain_id = None, "contract_address"),
            (|i| i.chain_id = Some(0), "chain_id"),
        ];
        for (mutate, field) in cases {
            let mut i = input();
            mutate(&mut i);
            assert_eq!(i.parse().unwrap_err().field, field);
        }
    }
}
