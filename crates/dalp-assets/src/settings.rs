//! Organisation settings (versioned, cached with transactional invalidation), currencies and
//! FX rates. Part of [`AssetStore`]: the only code touching `dalp_assets`.

use chrono::{DateTime, Utc};
use dalp_audit::RequestContext;
use dalp_db::TypedClient;
use dalp_types::{Decimal, EvmAddress, Invalid};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::store::{AssetError, AssetStore, Cached};

/// NOTIFY channel of asset-domain cache invalidations (the asset store's cache).
pub use crate::store::CACHE_CHANNEL;
/// The settings an organisation saved (a value type of the domain, in `types`).
pub use crate::types::OrgSettings;
/// Base currency of an organisation that has saved no settings.
pub const DEFAULT_BASE_CURRENCY: &str = "EUR";

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsInput {
    /// ISO 4217.
    #[schema(pattern = "^[A-Za-z]{3}$")]
    pub base_currency: String,
    #[serde(default)]
    #[schema(max_items = 32, inline, value_type = Vec<CurrencyCode>)]
    pub target_currencies: Vec<String>,
    #[schema(pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$")]
    pub system_address: Option<String>,
    /// Feature toggles: `{"name": true|false}`.
    #[serde(default)]
    pub features: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FxInput {
    #[schema(pattern = "^[A-Za-z]{3}$")]
    pub base: String,
    #[schema(pattern = "^[A-Za-z]{3}$")]
    pub quote: String,
    #[schema(max_length = 100, extensions(("x-dalp-text" = json!(true))))]
    pub provider: String,
    pub effective_at: DateTime<Utc>,
    /// Decimal text, e.g. "1.0842": never a float.
    pub rate: String,
}

/// An ISO 4217 currency code, e.g. EUR.
#[derive(utoipa::ToSchema)]
#[schema(pattern = "^[A-Za-z]{3}$")]
#[allow(dead_code)] // describes the strings of `target_currencies`
pub struct CurrencyCode(String);

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FxRate {
    pub base: String,
    pub quote: String,
    pub provider: String,
    pub effective_at: DateTime<Utc>,
    /// Exact decimal as text.
    pub rate: String,
}

pub(crate) fn currency(field: &'static str, s: &str) -> Result<String, Invalid> {
    let c = s.trim().to_ascii_uppercase();
    if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Invalid::new(field, "must be an ISO 4217 code like EUR"));
    }
    Ok(c)
}

const SETTINGS_COLUMNS: &str =
    "organisation_id, base_currency, target_currencies, system_address, features, version, updated_at, updated_by";

fn settings_from(r: &Row) -> OrgSettings {
    OrgSettings {
        organisation_id: r.get(0),
        base_currency: r.get(1),
        target_currencies: r.get(2),
        system_address: r.get(3),
        features: r.get(4),
        version: r.get(5),
        updated_at: Some(r.get(6)),
        updated_by: Some(r.get(7)),
    }
}

impl AssetStore {
    async fn unknown_currencies(&self, codes: &[String]) -> Result<Vec<String>, AssetError> {
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        Ok(client
            .typed_query(
                "SELECT c FROM unnest($1::text[]) AS c WHERE NOT EXISTS (SELECT 1 FROM dalp_assets.currencies WHERE code = c)",
                &[&codes],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Every known currency: `(code, name, decimals)`.
    #[tracing::instrument(target = "dalp_store", name = "assets.currencies", skip_all)]
    pub async fn currencies(&self) -> Result<Vec<(String, String, i16)>, AssetError> {
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        Ok(client
            .typed_query(
                "SELECT code, name, decimals FROM dalp_assets.currencies ORDER BY code",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Settings of `org` (defaults when never saved), served from the cache when possible.
    #[tracing::instrument(target = "dalp_store", name = "assets.settings", skip_all)]
    pub async fn settings(&self, org: Uuid) -> Result<OrgSettings, AssetError> {
        let key = format!("settings:{org}");
        if let Some(Cached::Settings(s)) = self.cache().get(&key) {
            return Ok(s);
        }
        let generation = self.cache().generation();
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        let row = client
            .typed_query_opt(
                &format!("SELECT {SETTINGS_COLUMNS} FROM dalp_assets.organisation_settings WHERE organisation_id = $1"),
                &[&org],
            )
            .await?;
        let s = match row {
            Some(r) => settings_from(&r),
            None => OrgSettings {
                organisation_id: org,
                base_currency: DEFAULT_BASE_CURRENCY.into(),
                target_currencies: vec![],
                system_address: None,
                features: json!({}),
                version: 0,
                updated_at: None,
                updated_by: None,
            },
        };
        self.cache().insert(
            key,
            Cached::Settings(s.clone()),
            vec![format!("settings:{org}")],
            generation,
        );
        Ok(s)
    }

    /// Saves settings if `expected_version` is current (0 for never saved); the version row,
    /// the audit record and the cache notification commit together.
    #[tracing::instrument(target = "dalp_store", name = "assets.put_settings", skip_all)]
    pub async fn put_settings(
        &self,
        ctx: &RequestContext,
        org: Uuid,
        expected_version: i32,
        input: SettingsInput,
    ) -> Result<OrgSettings, AssetError> {
        let base = currency("base_currency", &input.base_currency)?;
        let targets = input
            .target_currencies
            .iter()
            .map(|c| currency("target_currencies", c))
            .collect::<Result<Vec<_>, _>>()?;
        if targets.len() > 32 {
            return Err(Invalid::new("target_currencies", "at most 32").into());
        }
        if let Some(dup) = targets
            .iter()
            .enumerate()
            .find(|(i, c)| targets[..*i].contains(c))
            .map(|(_, c)| c)
        {
            return Err(
                Invalid::new("target_currencies", format!("lists {dup} more than once")).into(),
            );
        }
        if !self
            .unknown_currencies(std::slice::from_ref(&base))
            .await?
            .is_empty()
        {
            return Err(Invalid::new("base_currency", format!("unknown currency {base}")).into());
        }
        let unknown = self.unknown_currencies(&targets).await?;
        if !unknown.is_empty() {
            return Err(Invalid::new(
                "target_currencies",
                format!("unknown currencies: {}", unknown.join(", ")),
            )
            .into());
        }
        let address = input
            .system_address
            .as_deref()
            .map(|a| EvmAddress::parse(a).map_err(|e| e.for_field("system_address")))
            .transpose()?
            .map(|a| a.lower());
        for (k, v) in &input.features {
            let ok_key = !k.is_empty()
                && k.len() <= 64
                && k.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok_key || !v.is_boolean() {
                return Err(
                    Invalid::new("features", "must map lower-case names to true or false").into(),
                );
            }
        }
        let features = Value::Object(input.features);

        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.put_settings").await?;
        let current = tx
            .typed_query_opt(
                "SELECT version, to_jsonb(s) FROM dalp_assets.organisation_settings s WHERE organisation_id = $1 FOR UPDATE",
                &[&org],
            )
            .await?;
        let (current_version, before): (i32, Option<Value>) = match &current {
            Some(r) => (r.get(0), Some(r.get(1))),
            None => (0, None),
        };
        if current_version != expected_version {
            return Err(AssetError::Conflict {
                id: org,
                expected: expected_version,
                current: current_version,
            });
        }
        let row = tx
            .typed_query_one(
                &format!(
                    "INSERT INTO dalp_assets.organisation_settings
                         (organisation_id, base_currency, target_currencies, system_address, features, updated_by)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (organisation_id) DO UPDATE SET base_currency = EXCLUDED.base_currency,
                         target_currencies = EXCLUDED.target_currencies, system_address = EXCLUDED.system_address,
                         features = EXCLUDED.features, updated_by = EXCLUDED.updated_by, updated_at = now(),
                         version = dalp_assets.organisation_settings.version + 1
                     RETURNING {SETTINGS_COLUMNS}"
                ),
                &[&org, &base, &targets, &address, &features, &ctx.actor],
            )
            .await?;
        let saved = settings_from(&row);
        tx.typed_execute(
            "INSERT INTO dalp_assets.settings_versions (organisation_id, version, changed_by, before, after)
             SELECT $1, $2, $3, $4, to_jsonb(s) FROM dalp_assets.organisation_settings s WHERE organisation_id = $1",
            &[&org, &saved.version, &ctx.actor, &before],
        )
        .await?;
        tx.record(
            &ctx.event("assets.settings.update", "organisation_settings")
                .resource(org)
                .details(json!({ "version": saved.version })),
        )
        .await?;
        tx.invalidate([format!("settings:{org}")]);
        tx.commit().await?;
        Ok(saved)
    }

    /// Records an FX rate (audited).
    #[tracing::instrument(target = "dalp_store", name = "assets.record_fx", skip_all)]
    pub async fn record_fx(
        &self,
        ctx: &RequestContext,
        input: FxInput,
    ) -> Result<FxRate, AssetError> {
        let base = currency("base", &input.base)?;
        let quote = currency("quote", &input.quote)?;
        if base == quote {
            return Err(Invalid::new("quote", "must differ from base").into());
        }
        let provider = input.provider.trim().to_lowercase();
        if provider.is_empty()
            || provider.len() > 63
            || !provider
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        {
            return Err(
                Invalid::new("provider", "must be a short lower-case name like ecb").into(),
            );
        }
        let rate = Decimal::parse("rate", &input.rate, 20, 18)?;
        if rate.is_zero() {
            return Err(Invalid::new("rate", "must be greater than zero").into());
        }
        let unknown = self
            .unknown_currencies(&[base.clone(), quote.clone()])
            .await?;
        if let Some(u) = unknown.first() {
            let field = if *u == base { "base" } else { "quote" };
            return Err(Invalid::new(field, format!("unknown currency {u}")).into());
        }
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.record_fx").await?;
        let row = tx
            .typed_query_one(
                "INSERT INTO dalp_assets.fx_rates (base, quote, provider, effective_at, rate, recorded_by)
                 VALUES ($1, $2, $3, $4, $5::text::numeric, $6) RETURNING rate::text",
                &[&base, &quote, &provider, &input.effective_at, &rate.as_str(), &ctx.actor],
            )
            .await?;
        tx.record(&ctx.event("assets.fx.record", "fx_rate")
                .resource(format!("{base}/{quote}"))
                .details(json!({ "provider": provider, "effective_at": input.effective_at, "rate": rate.as_str() })),
        )
        .await?;
        tx.commit().await?;
        Ok(FxRate {
            base,
            quote,
            provider,
            effective_at: input.effective_at,
            rate: trim_rate(row.get(0)),
        })
    }

    /// The newest rate per pair, optionally for one base currency.
    #[tracing::instrument(target = "dalp_store", name = "assets.latest_fx", skip_all)]
    pub async fn latest_fx(&self, base: Option<&str>) -> Result<Vec<FxRate>, AssetError> {
        let base = base.map(|b| currency("base", b)).transpose()?;
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        let rows = client
            .typed_query(
                "SELECT base, quote, provider, effective_at, rate::text FROM dalp_assets.fx_latest
                  WHERE ($1::text IS NULL OR base = $1) ORDER BY base, quote",
                &[&base],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| FxRate {
                base: r.get(0),
                quote: r.get(1),
                provider: r.get(2),
                effective_at: r.get(3),
                rate: trim_rate(r.get(4)),
            })
            .collect())
    }
}

/// numeric(38,18) prints 18 decimals; drop the trailing zeros.
fn trim_rate(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}
