//! Asset values, parsed before they reach SQL; every failure names its field.

use chrono::{DateTime, Utc};
use dalp_types::{ChainId, Country, Decimal, EvmAddress, Invalid, Isin};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// What kind of instrument an asset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssetInput {
    pub organisation_id: Uuid,
    #[schema(max_length = 50, extensions(("x-dalp-text" = json!(true))))]
    pub name: String,
    #[schema(pattern = "^[A-Z0-9][A-Z0-9.-]{0,11}$")]
    pub symbol: String,
    #[schema(minimum = 0, maximum = 18)]
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
    /// Fields of the base type: bond `face_value`, `maturity_date`, `denomination_asset`,
    /// `cap`; fund `management_fee_bps`, `fund_class`, `category`; equity `equity_class`,
    /// `category`; stablecoin and deposit `base_price`. Amounts are decimal text.
    #[serde(default)]
    pub details: Option<serde_json::Value>,
}

/// Validates the base type's own fields; returns them normalised (decimals canonical).
fn parse_details(
    base: BaseType,
    details: Option<serde_json::Value>,
) -> Result<serde_json::Value, Invalid> {
    use serde_json::{Map, Value};
    let obj = match details {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(Invalid::new("details", "must be an object")),
    };
    let allowed: &[&'static str] = match base {
        BaseType::Bond => &["face_value", "maturity_date", "denomination_asset", "cap"],
        BaseType::Fund => &["management_fee_bps", "fund_class", "category"],
        BaseType::Equity => &["equity_class", "category"],
        BaseType::Stablecoin | BaseType::Deposit => &["base_price"],
        BaseType::RealEstate | BaseType::PreciousMetal => &[],
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(Invalid::new(
            "details",
            format!(
                "`{k}` is not a field of a {}; fields: {}",
                base.as_str(),
                allowed.join(", ")
            ),
        ));
    }
    let mut out = Map::new();
    let field = |k: &str| allowed.iter().copied().find(|a| *a == k).expect("allowed");
    let text = |k: &'static str, max: usize, required: bool| -> Result<Option<String>, Invalid> {
        match obj.get(k) {
            None | Some(Value::Null) if required => Err(Invalid::new(k, "is required")),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= max => {
                Ok(Some(s.trim().to_string()))
            }
            Some(_) => Err(Invalid::new(
                k,
                format!("must be text of 1 to {max} characters"),
            )),
        }
    };
    let amount = |k: &'static str, required: bool| -> Result<Option<String>, Invalid> {
        match obj.get(k) {
            None | Some(Value::Null) if required => Err(Invalid::new(k, "is required")),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let d = Decimal::parse(k, s, 38, 18)?;
                if d.is_zero() {
                    return Err(Invalid::new(k, "must be greater than zero"));
                }
                Ok(Some(d.as_str().to_string()))
            }
            Some(_) => Err(Invalid::new(
                k,
                "must be an exact decimal given as text, e.g. \"1000.00\"",
            )),
        }
    };
    match base {
        BaseType::Bond => {
            let fv = amount(field("face_value"), true)?;
            let md = text(field("maturity_date"), 10, true)?.expect("required");
            chrono::NaiveDate::parse_from_str(&md, "%Y-%m-%d")
                .map_err(|_| Invalid::new("maturity_date", "must be a date YYYY-MM-DD"))?;
            let den = text(field("denomination_asset"), 64, true)?;
            out.insert("face_value".into(), fv.into());
            out.insert("maturity_date".into(), md.into());
            out.insert("denomination_asset".into(), den.into());
            if let Some(cap) = amount(field("cap"), false)? {
                out.insert("cap".into(), cap.into());
            }
        }
        BaseType::Fund => {
            let fee = match obj.get("management_fee_bps") {
                Some(Value::Number(n))
                    if n.as_i64()
                        .map(|v| (0..=10_000).contains(&v))
                        .unwrap_or(false) =>
                {
                    n.as_i64().expect("checked")
                }
                None | Some(Value::Null) => {
                    return Err(Invalid::new("management_fee_bps", "is required"))
                }
                Some(_) => {
                    return Err(Invalid::new(
                        "management_fee_bps",
                        "must be a whole number of basis points, 0 to 10000",
                    ))
                }
            };
            out.insert("management_fee_bps".into(), fee.into());
            for k in ["fund_class", "category"] {
                if let Some(v) = text(field(k), 50, false)? {
                    out.insert(k.into(), v.into());
                }
            }
        }
        BaseType::Equity => {
            for k in ["equity_class", "category"] {
                if let Some(v) = text(field(k), 50, false)? {
                    out.insert(k.into(), v.into());
                }
            }
        }
        BaseType::Stablecoin | BaseType::Deposit => {
            out.insert(
                "base_price".into(),
                amount(field("base_price"), true)?.into(),
            );
        }
        BaseType::RealEstate | BaseType::PreciousMetal => {}
    }
    Ok(Value::Object(out))
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
    /// Normalised type-specific fields.
    pub details: serde_json::Value,
}

impl AssetInput {
    /// Validates every field; the first failure names its field.
    pub fn parse(self) -> Result<AssetSpec, Invalid> {
        let name = dalp_types::parse_text("name", &self.name, 50)?;
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
            Some(c) => Some(Country::from_numeric("country_numeric", c)?.numeric() as i16),
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
        let details = parse_details(self.base_type, self.details)?;
        Ok(AssetSpec {
            details,
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
            details: Some(
                serde_json::json!({ "face_value": "1000.00", "maturity_date": "2030-12-31", "denomination_asset": "EUR" }),
            ),
        }
    }

    #[test]
    fn type_specific_fields_are_checked_per_base_type() {
        let mut fund = input();
        fund.base_type = BaseType::Fund;
        fund.details = Some(serde_json::json!({ "management_fee_bps": 10001 }));
        assert_eq!(
            fund.clone().parse().unwrap_err().field,
            "management_fee_bps"
        );
        fund.details = Some(serde_json::json!({ "management_fee_bps": 150, "fund_class": "A" }));
        assert!(fund.clone().parse().is_ok());
        fund.details = Some(serde_json::json!({ "face_value": "1" }));
        assert_eq!(fund.parse().unwrap_err().field, "details");
        let mut b = input();
        b.details = Some(
            serde_json::json!({ "face_value": 1000.0, "maturity_date": "2030-12-31", "denomination_asset": "EUR" }),
        );
        assert_eq!(b.clone().parse().unwrap_err().field, "face_value");
        b.details = Some(
            serde_json::json!({ "face_value": "0100.50", "maturity_date": "2030-12-31", "denomination_asset": "EUR" }),
        );
        assert_eq!(b.parse().unwrap().details["face_value"], "100.5");
        let mut s = input();
        s.base_type = BaseType::Stablecoin;
        s.details = None;
        assert_eq!(s.parse().unwrap_err().field, "base_price");
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
            (|i| i.country_numeric = Some(999), "country_numeric"),
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

/// An organisation's settings: base and target currencies, system address, feature flags.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct OrgSettings {
    pub organisation_id: Uuid,
    pub base_currency: String,
    pub target_currencies: Vec<String>,
    pub system_address: Option<String>,
    pub features: Value,
    /// 0 until the settings are first saved; send it back as `If-Match`.
    pub version: i32,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<String>,
}
