//! `dalp up --demo`: an organisation, an administrator, a bond and a stablecoin, so a
//! newcomer can explore the API at once. Idempotent: nothing is created twice.

use anyhow::Context;
use dalp_api::AppState;
use dalp_assets::types::{AssetInput, BaseType};
use dalp_identity::store::NewUser;
use dalp_identity::types::{Email, Password, PlatformRole};
use dalp_identity::RequestContext;
use serde_json::json;

pub const DEMO_ORG: &str = "demo";
pub const DEMO_ADMIN: &str = "admin@demo.dalp.example";

/// Seeds the demo data unless present; returns the admin's password when it was created now.
pub async fn seed(state: &AppState) -> anyhow::Result<Option<String>> {
    let ctx = RequestContext::service("demo-seed");
    if state
        .identity
        .organisation_by_slug(DEMO_ORG)
        .await?
        .is_some()
    {
        return Ok(None);
    }
    let password = dalp_db::roles::generate_password(20);
    let admin = state
        .identity
        .create_user(
            &ctx,
            NewUser {
                email: Email::parse(DEMO_ADMIN)?,
                name: "Demo Administrator".into(),
                password: Some(Password::parse(&password)?),
                wallet_address: None,
                roles: vec![
                    PlatformRole::Admin,
                    PlatformRole::TokenManager,
                    PlatformRole::ComplianceManager,
                    PlatformRole::Auditor,
                ],
            },
        )
        .await
        .context("create the demo administrator")?;
    let org = state
        .identity
        .create_organisation(&ctx, DEMO_ORG, "Demo Bank", admin.id)
        .await
        .context("create the demo organisation")?;
    let assets = [
        AssetInput {
            organisation_id: org,
            name: "Demo Green Bond 2030".into(),
            symbol: "DGB30".into(),
            decimals: 6,
            base_type: BaseType::Bond,
            isin: Some("XS2314659447".into()),
            country_numeric: Some(442),
            chain_id: None,
            contract_address: None,
            template_id: None,
            metadata: None,
            details: Some(
                json!({ "face_value": "1000.00", "maturity_date": "2030-12-31", "denomination_asset": "EUR", "cap": "50000000" }),
            ),
        },
        AssetInput {
            organisation_id: org,
            name: "Demo Euro Stablecoin".into(),
            symbol: "DEUR".into(),
            decimals: 18,
            base_type: BaseType::Stablecoin,
            isin: None,
            country_numeric: Some(442),
            chain_id: None,
            contract_address: None,
            template_id: None,
            metadata: None,
            details: Some(json!({ "base_price": "1.00" })),
        },
    ];
    for a in assets {
        let name = a.name.clone();
        let spec = a.parse().with_context(|| format!("demo asset {name}"))?;
        state
            .assets
            .create(&ctx, &spec)
            .await
            .with_context(|| format!("create demo asset {name}"))?;
    }
    Ok(Some(password))
}
