//! Compliance module configuration per asset: an ordered list of typed, validated modules.
//! On a draft asset a change applies at once; on a published asset it becomes a pending
//! change that applies only when a *different* person approves it (four-eyes). Part of
//! [`AssetStore`].

use dalp_audit::RequestContext;
use dalp_db::TypedClient;
use dalp_types::{Decimal, EvmAddress, Invalid};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::store::{AssetError, AssetStore};

/// One compliance module with its parameters. Unknown modules and unknown parameters are
/// refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Module {
    AddressBlockList {
        addresses: Vec<String>,
    },
    CountryAllowList {
        countries: Vec<i64>,
    },
    CountryBlockList {
        countries: Vec<i64>,
    },
    IdentityAllowList {
        identities: Vec<String>,
    },
    IdentityBlockList {
        identities: Vec<String>,
    },
    #[serde(rename = "SMARTIdentityVerification")]
    SmartIdentityVerification {
        claim_topics: Vec<i64>,
    },
    TokenSupplyLimit {
        max_supply: String,
    },
    InvestorCount {
        max_investors: i64,
    },
    TimeLock {
        hold_seconds: i64,
    },
    TransferApproval {
        approvers: Vec<String>,
    },
    CapitalRaiseLimit {
        max_amount: String,
        currency: String,
    },
    Collateral {
        ratio_bps: i64,
    },
}

impl Module {
    fn name(&self) -> &'static str {
        match self {
            Module::AddressBlockList { .. } => "AddressBlockList",
            Module::CountryAllowList { .. } => "CountryAllowList",
            Module::CountryBlockList { .. } => "CountryBlockList",
            Module::IdentityAllowList { .. } => "IdentityAllowList",
            Module::IdentityBlockList { .. } => "IdentityBlockList",
            Module::SmartIdentityVerification { .. } => "SMARTIdentityVerification",
            Module::TokenSupplyLimit { .. } => "TokenSupplyLimit",
            Module::InvestorCount { .. } => "InvestorCount",
            Module::TimeLock { .. } => "TimeLock",
            Module::TransferApproval { .. } => "TransferApproval",
            Module::CapitalRaiseLimit { .. } => "CapitalRaiseLimit",
            Module::Collateral { .. } => "Collateral",
        }
    }
}

fn addresses(list: &[String], what: &str, at: &str) -> Result<Vec<String>, Invalid> {
    if list.is_empty() || list.len() > 1000 {
        return Err(Invalid::new(
            "modules",
            format!("{at}: {what} must list 1 to 1000 addresses"),
        ));
    }
    list.iter()
        .map(|a| {
            EvmAddress::parse(a)
                .map(|a| a.lower())
                .map_err(|e| Invalid::new("modules", format!("{at}: {what}: {}", e.message)))
        })
        .collect()
}

fn countries(list: &[i64], at: &str) -> Result<Vec<i64>, Invalid> {
    if list.is_empty() {
        return Err(Invalid::new(
            "modules",
            format!("{at}: countries must list at least one ISO 3166-1 numeric code"),
        ));
    }
    for c in list {
        dalp_types::Country::from_numeric("modules", *c)
            .map_err(|e| Invalid::new("modules", format!("{at}: {}", e.message)))?;
    }
    let mut v = list.to_vec();
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Validates and normalises an ordered module list (addresses lower-cased, lists sorted).
pub fn validate(modules: Vec<Module>) -> Result<Vec<Module>, Invalid> {
    if modules.len() > 12 {
        return Err(Invalid::new("modules", "at most 12 modules"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(modules.len());
    for (i, m) in modules.into_iter().enumerate() {
        let at = format!("module {} ({})", i + 1, m.name());
        if !seen.insert(m.name()) {
            return Err(Invalid::new("modules", format!("{at}: appears twice")));
        }
        let positive = |v: i64, what: &str, max: i64| {
            if (1..=max).contains(&v) {
                Ok(v)
            } else {
                Err(Invalid::new(
                    "modules",
                    format!("{at}: {what} must be 1 to {max}"),
                ))
            }
        };
        let amount = |s: &str, what: &str| {
            let d = Decimal::parse("modules", s, 60, 18)
                .map_err(|e| Invalid::new("modules", format!("{at}: {what} {}", e.message)))?;
            if d.is_zero() {
                return Err(Invalid::new(
                    "modules",
                    format!("{at}: {what} must be greater than zero"),
                ));
            }
            Ok(d.as_str().to_string())
        };
        out.push(match m {
            Module::AddressBlockList { addresses: a } => Module::AddressBlockList {
                addresses: addresses(&a, "addresses", &at)?,
            },
            Module::CountryAllowList { countries: c } => Module::CountryAllowList {
                countries: countries(&c, &at)?,
            },
            Module::CountryBlockList { countries: c } => Module::CountryBlockList {
                countries: countries(&c, &at)?,
            },
            Module::IdentityAllowList { identities } => Module::IdentityAllowList {
                identities: addresses(&identities, "identities", &at)?,
            },
            Module::IdentityBlockList { identities } => Module::IdentityBlockList {
                identities: addresses(&identities, "identities", &at)?,
            },
            Module::SmartIdentityVerification { claim_topics } => {
                if claim_topics.is_empty() || claim_topics.iter().any(|t| *t <= 0) {
                    return Err(Invalid::new(
                        "modules",
                        format!("{at}: claim_topics must list positive topic ids"),
                    ));
                }
                Module::SmartIdentityVerification { claim_topics }
            }
            Module::TokenSupplyLimit { max_supply } => Module::TokenSupplyLimit {
                max_supply: amount(&max_supply, "max_supply")?,
            },
            Module::InvestorCount { max_investors } => Module::InvestorCount {
                max_investors: positive(max_investors, "max_investors", 10_000_000)?,
            },
            Module::TimeLock { hold_seconds } => Module::TimeLock {
                hold_seconds: positive(hold_seconds, "hold_seconds", 10 * 365 * 86_400)?,
            },
            Module::TransferApproval { approvers } => Module::TransferApproval {
                approvers: addresses(&approvers, "approvers", &at)?,
            },
            Module::CapitalRaiseLimit {
                max_amount,
                currency,
            } => {
                let c = crate::settings::currency("modules", &currency).map_err(|e| {
                    Invalid::new("modules", format!("{at}: currency {}", e.message))
                })?;
                Module::CapitalRaiseLimit {
                    max_amount: amount(&max_amount, "max_amount")?,
                    currency: c,
                }
            }
            Module::Collateral { ratio_bps } => Module::Collateral {
                ratio_bps: positive(ratio_bps, "ratio_bps", 100_000)?,
            },
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ComplianceConfig {
    pub asset_id: Uuid,
    pub modules: Value,
    /// 0 before the first change; send it back as `If-Match`.
    pub version: i32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Proposal {
    /// The asset is a draft: applied at once.
    Applied { config: ComplianceConfig },
    /// The asset is published: waits for a second person's approval.
    Pending { change_id: Uuid },
}

impl AssetStore {
    #[tracing::instrument(target = "dalp_store", name = "assets.compliance", skip_all)]
    pub async fn compliance(&self, asset_id: Uuid) -> Result<ComplianceConfig, AssetError> {
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        if client
            .typed_query_opt(
                "SELECT 1 FROM dalp_assets.assets WHERE id = $1",
                &[&asset_id],
            )
            .await?
            .is_none()
        {
            return Err(AssetError::NotFound("asset"));
        }
        let row = client
            .typed_query_opt(
                "SELECT modules, version FROM dalp_assets.compliance_configs WHERE asset_id = $1",
                &[&asset_id],
            )
            .await?;
        Ok(match row {
            Some(r) => ComplianceConfig {
                asset_id,
                modules: r.get(0),
                version: r.get(1),
            },
            None => ComplianceConfig {
                asset_id,
                modules: json!([]),
                version: 0,
            },
        })
    }

    /// Proposes `modules` for an asset whose configuration is at `expected_version`.
    #[tracing::instrument(target = "dalp_store", name = "assets.propose_compliance", skip_all)]
    pub async fn propose_compliance(
        &self,
        ctx: &RequestContext,
        asset_id: Uuid,
        expected_version: i32,
        modules: Vec<Module>,
    ) -> Result<Proposal, AssetError> {
        let modules = serde_json::to_value(validate(modules)?).expect("modules serialize");
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.propose_compliance").await?;
        let status: String = tx
            .typed_query_opt(
                "SELECT status FROM dalp_assets.assets WHERE id = $1 FOR SHARE",
                &[&asset_id],
            )
            .await?
            .ok_or(AssetError::NotFound("asset"))?
            .get(0);
        let current = current_version(&tx, asset_id).await?;
        if current.0 != expected_version {
            return Err(AssetError::Conflict {
                id: asset_id,
                expected: expected_version,
                current: current.0,
            });
        }
        if status == "published" {
            let change_id: Uuid = tx
                .typed_query_one(
                    "INSERT INTO dalp_assets.compliance_changes (asset_id, base_version, modules, proposed_by) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&asset_id, &expected_version, &modules, &ctx.actor],
                )
                .await?
                .get(0);
            tx.record(
                &ctx.event("assets.compliance.propose", "asset")
                    .resource(asset_id)
                    .details(json!({ "change_id": change_id })),
            )
            .await?;
            tx.commit().await?;
            return Ok(Proposal::Pending { change_id });
        }
        let config = apply(&mut tx, ctx, asset_id, current, &modules, None).await?;
        tx.commit().await?;
        Ok(Proposal::Applied { config })
    }

    /// Approves a pending change; the approver must not be its proposer. A change whose base
    /// version is no longer current is marked superseded and fails with a conflict.
    #[tracing::instrument(target = "dalp_store", name = "assets.approve_compliance", skip_all)]
    pub async fn approve_compliance(
        &self,
        ctx: &RequestContext,
        change_id: Uuid,
    ) -> Result<ComplianceConfig, AssetError> {
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.approve_compliance").await?;
        let row = tx
            .typed_query_opt(
                "SELECT asset_id, base_version, modules, proposed_by, status FROM dalp_assets.compliance_changes WHERE id = $1 FOR UPDATE",
                &[&change_id],
            )
            .await?
            .ok_or(AssetError::NotFound("compliance change"))?;
        let (asset_id, base, modules, proposer, status): (Uuid, i32, Value, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if status != "pending" {
            return Err(AssetError::NotPending(status));
        }
        if proposer == ctx.actor {
            return Err(AssetError::FourEyes);
        }
        let current = current_version(&tx, asset_id).await?;
        if current.0 != base {
            tx.typed_execute(
                "UPDATE dalp_assets.compliance_changes SET status = 'superseded', decided_by = $2, decided_at = now() WHERE id = $1",
                &[&change_id, &ctx.actor],
            )
            .await?;
            tx.commit().await?;
            return Err(AssetError::Conflict {
                id: asset_id,
                expected: base,
                current: current.0,
            });
        }
        let config = apply(
            &mut tx,
            &RequestContext {
                actor: proposer,
                ..ctx.clone()
            },
            asset_id,
            current,
            &modules,
            Some(&ctx.actor),
        )
        .await?;
        tx.typed_execute(
            "UPDATE dalp_assets.compliance_changes SET status = 'applied', decided_by = $2, decided_at = now() WHERE id = $1",
            &[&change_id, &ctx.actor],
        )
        .await?;
        tx.record(
            &ctx.event("assets.compliance.approve", "asset")
                .resource(asset_id)
                .details(json!({ "change_id": change_id, "version": config.version })),
        )
        .await?;
        tx.commit().await?;
        Ok(config)
    }

    /// Moves an asset from draft to published (needs the asset's current version).
    #[tracing::instrument(target = "dalp_store", name = "assets.publish", skip_all)]
    pub async fn publish(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        expected_version: i32,
    ) -> Result<crate::store::Asset, AssetError> {
        self.set_status(ctx, id, expected_version, "published")
            .await
    }
}

/// `(version, modules)` of the current configuration, locked; `(0, [])` when none.
async fn current_version(
    tx: &deadpool_postgres::Transaction<'_>,
    asset_id: Uuid,
) -> Result<(i32, Option<Value>), AssetError> {
    let row = tx
        .typed_query_opt("SELECT version, modules FROM dalp_assets.compliance_configs WHERE asset_id = $1 FOR UPDATE", &[&asset_id])
        .await?;
    Ok(row.map(|r| (r.get(0), Some(r.get(1)))).unwrap_or((0, None)))
}

/// Writes the configuration, its version row and audit record.
async fn apply(
    tx: &mut dalp_db::write::Write<'_>,
    ctx: &RequestContext,
    asset_id: Uuid,
    current: (i32, Option<Value>),
    modules: &Value,
    approved_by: Option<&str>,
) -> Result<ComplianceConfig, AssetError> {
    let version = current.0 + 1;
    tx.typed_execute(
        "INSERT INTO dalp_assets.compliance_configs (asset_id, modules, version, updated_by) VALUES ($1, $2, $3, $4)
         ON CONFLICT (asset_id) DO UPDATE SET modules = EXCLUDED.modules, version = EXCLUDED.version,
             updated_by = EXCLUDED.updated_by, updated_at = now()",
        &[&asset_id, modules, &version, &ctx.actor],
    )
    .await?;
    tx.typed_execute(
        "INSERT INTO dalp_assets.compliance_versions (asset_id, version, changed_by, approved_by, before, after) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&asset_id, &version, &ctx.actor, &approved_by, &current.1, modules],
    )
    .await?;
    tx.record(
        &ctx.event("assets.compliance.update", "asset")
            .resource(asset_id)
            .details(json!({ "version": version, "approved_by": approved_by })),
    )
    .await?;
    Ok(ComplianceConfig {
        asset_id,
        modules: modules.clone(),
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Vec<Module>, Invalid> {
        let m: Vec<Module> =
            serde_json::from_value(v).map_err(|e| Invalid::new("modules", e.to_string()))?;
        validate(m)
    }

    #[test]
    fn modules_are_typed_and_validated() {
        let ok = parse(json!([
            { "type": "CountryAllowList", "countries": [442, 276, 442] },
            { "type": "TokenSupplyLimit", "max_supply": "1000000.50" },
            { "type": "SMARTIdentityVerification", "claim_topics": [1, 2] },
            { "type": "AddressBlockList", "addresses": ["0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"] }
        ]))
        .unwrap();
        assert_eq!(
            ok[0],
            Module::CountryAllowList {
                countries: vec![276, 442]
            }
        );
        assert_eq!(
            ok[3],
            Module::AddressBlockList {
                addresses: vec!["0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed".into()]
            }
        );
        for bad in [
            json!([{ "type": "NoSuchModule" }]),
            json!([{ "type": "TimeLock", "hold_seconds": 0 }]),
            json!([{ "type": "TimeLock", "hold_seconds": 10, "extra": 1 }]),
            json!([{ "type": "CountryBlockList", "countries": [] }]),
            json!([{ "type": "CountryBlockList", "countries": [999] }]),
            json!([{ "type": "TokenSupplyLimit", "max_supply": 5.5 }]),
            json!([{ "type": "TokenSupplyLimit", "max_supply": "0" }]),
            json!([{ "type": "Collateral", "ratio_bps": 100001 }]),
            json!([{ "type": "TransferApproval", "approvers": ["0x12"] }]),
            json!([{ "type": "InvestorCount", "max_investors": 5 }, { "type": "InvestorCount", "max_investors": 6 }]),
        ] {
            assert!(parse(bad.clone()).is_err(), "{bad}");
        }
    }
}
