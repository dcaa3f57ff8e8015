//! Instrument templates and the metadata they prescribe. A template is a draft until
//! published; after that its key fields (slug, types, features, metadata schema) never change
//! (the store refuses with [`AssetError::TemplatePublished`], a trigger backs it up). Part of
//! [`AssetStore`].

use chrono::NaiveDate;
use dalp_audit::RequestContext;
use dalp_db::TypedClient;
use dalp_types::{Decimal, EvmAddress, Invalid};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::store::{AssetError, AssetStore};
use crate::types::BaseType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssetClass {
    FixedIncome,
    FlexibleIncome,
    CashEquivalent,
    RealAsset,
}

impl AssetClass {
    fn as_str(self) -> &'static str {
        match self {
            AssetClass::FixedIncome => "fixed_income",
            AssetClass::FlexibleIncome => "flexible_income",
            AssetClass::CashEquivalent => "cash_equivalent",
            AssetClass::RealAsset => "real_asset",
        }
    }
}

/// Token features a template may require.
pub const FEATURES: [&str; 8] = [
    "historical-balances",
    "maturity-redemption",
    "fixed-treasury-yield",
    "voting-power",
    "aum-fee",
    "transaction-fee",
    "conversion",
    "permit",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Integer,
    Decimal,
    Date,
    Boolean,
    Address,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    pub max_length: Option<usize>,
    /// Inclusive bounds for integer and decimal fields (decimal text).
    pub min: Option<String>,
    pub max: Option<String>,
    #[serde(rename = "enum")]
    pub allowed: Option<Vec<String>>,
}

/// One metadata field a template prescribes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub key: String,
    pub label: String,
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(default)]
    pub required: bool,
    /// False: the value is fixed once the asset exists.
    #[serde(default = "yes")]
    pub mutable: bool,
    #[serde(default)]
    pub constraints: Constraints,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateInput {
    /// Absent for a system template.
    pub organisation_id: Option<Uuid>,
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub slug: String,
    #[schema(max_length = 100, extensions(("x-dalp-text" = json!(true))))]
    pub name: String,
    pub base_type: BaseType,
    pub asset_class: AssetClass,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub metadata_schema: Vec<FieldSpec>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Template {
    pub id: Uuid,
    pub organisation_id: Option<Uuid>,
    pub slug: String,
    pub name: String,
    pub base_type: String,
    pub asset_class: String,
    pub features: Vec<String>,
    pub metadata_schema: Value,
    pub status: String,
    pub version: i32,
}

fn numeric(v: &str) -> Option<f64> {
    // Bounds compare as exact decimals would for the magnitudes templates use.
    v.parse::<f64>().ok()
}

impl TemplateInput {
    fn validate(&self) -> Result<(), Invalid> {
        dalp_types::parse_slug("slug", &self.slug)?;
        dalp_types::parse_text("name", &self.name, 100)?;
        if let Some(f) = self
            .features
            .iter()
            .find(|f| !FEATURES.contains(&f.as_str()))
        {
            return Err(Invalid::new(
                "features",
                format!("unknown feature `{f}`; known: {}", FEATURES.join(", ")),
            ));
        }
        let mut keys = std::collections::HashSet::new();
        for f in &self.metadata_schema {
            if f.key.is_empty()
                || f.key.len() > 64
                || !f
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(Invalid::new(
                    "metadata_schema",
                    format!("field key `{}` must be lower_snake_case", f.key),
                ));
            }
            if !keys.insert(&f.key) {
                return Err(Invalid::new(
                    "metadata_schema",
                    format!("field key `{}` appears twice", f.key),
                ));
            }
            for b in [&f.constraints.min, &f.constraints.max]
                .into_iter()
                .flatten()
            {
                if numeric(b).is_none() {
                    return Err(Invalid::new(
                        "metadata_schema",
                        format!("{}: bounds must be numbers", f.key),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks `metadata` against `schema`; with `previous`, immutable fields must keep their
/// value. Errors use field `metadata` and name the key.
pub fn validate_metadata(
    schema: &[FieldSpec],
    metadata: &Value,
    previous: Option<&Value>,
) -> Result<(), Invalid> {
    let bad = |m: String| Err(Invalid::new("metadata", m));
    let Some(obj) = metadata.as_object() else {
        return bad("must be an object".into());
    };
    if let Some(k) = obj.keys().find(|k| !schema.iter().any(|f| &f.key == *k)) {
        return bad(format!("`{k}` is not a field of the template"));
    }
    for f in schema {
        let v = obj.get(&f.key).filter(|v| !v.is_null());
        let Some(v) = v else {
            if f.required {
                return bad(format!("`{}` ({}) is required", f.key, f.label));
            }
            continue;
        };
        let ok = match f.kind {
            FieldType::String => v
                .as_str()
                .map(|s| {
                    f.constraints
                        .max_length
                        .map(|m| s.chars().count() <= m)
                        .unwrap_or(true)
                })
                .unwrap_or(false),
            FieldType::Integer => v.as_i64().is_some(),
            FieldType::Decimal => v
                .as_str()
                .map(|s| Decimal::parse("metadata", s, 38, 18).is_ok())
                .unwrap_or(false),
            FieldType::Date => v
                .as_str()
                .map(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok())
                .unwrap_or(false),
            FieldType::Boolean => v.is_boolean(),
            FieldType::Address => v
                .as_str()
                .map(|s| EvmAddress::parse(s).is_ok())
                .unwrap_or(false),
        };
        if !ok {
            return bad(format!(
                "`{}` must be a {:?}{}",
                f.key,
                f.kind,
                if f.kind == FieldType::Decimal {
                    " as decimal text"
                } else {
                    ""
                }
            )
            .to_lowercase());
        }
        let n = match f.kind {
            FieldType::Integer => v.as_i64().map(|i| i as f64),
            FieldType::Decimal => v.as_str().and_then(numeric),
            _ => None,
        };
        if let Some(n) = n {
            if f.constraints
                .min
                .as_deref()
                .and_then(numeric)
                .map(|m| n < m)
                .unwrap_or(false)
                || f.constraints
                    .max
                    .as_deref()
                    .and_then(numeric)
                    .map(|m| n > m)
                    .unwrap_or(false)
            {
                return bad(format!("`{}` is out of range", f.key));
            }
        }
        if let Some(allowed) = &f.constraints.allowed {
            if !v
                .as_str()
                .map(|s| allowed.iter().any(|a| a == s))
                .unwrap_or(false)
            {
                return bad(format!(
                    "`{}` must be one of: {}",
                    f.key,
                    allowed.join(", ")
                ));
            }
        }
        if let (false, Some(prev)) = (f.mutable, previous) {
            if prev.get(&f.key).filter(|p| !p.is_null()) != Some(v)
                && prev.get(&f.key).is_some_and(|p| !p.is_null())
            {
                return bad(format!("`{}` cannot change once set", f.key));
            }
        }
    }
    Ok(())
}

const COLUMNS: &str = "id, organisation_id, slug, name, base_type, asset_class, features, metadata_schema, status, version";

fn template_from(r: &Row) -> Template {
    Template {
        id: r.get(0),
        organisation_id: r.get(1),
        slug: r.get(2),
        name: r.get(3),
        base_type: r.get(4),
        asset_class: r.get(5),
        features: r.get(6),
        metadata_schema: r.get(7),
        status: r.get(8),
        version: r.get(9),
    }
}

impl AssetStore {
    async fn template_change(
        tx: &mut dalp_db::write::Write<'_>,
        ctx: &RequestContext,
        t: &Template,
        before: Option<Value>,
        action: &'static str,
    ) -> Result<(), AssetError> {
        tx.typed_execute(
            "INSERT INTO dalp_assets.template_versions (template_id, version, changed_by, before, after)
             SELECT $1, $2, $3, $4, to_jsonb(t) FROM dalp_assets.templates t WHERE id = $1",
            &[&t.id, &t.version, &ctx.actor, &before],
        )
        .await?;
        tx.record(
            &ctx.event(action, "template")
                .resource(t.id)
                .details(json!({ "version": t.version, "slug": t.slug })),
        )
        .await?;
        Ok(())
    }

    #[tracing::instrument(target = "dalp_store", name = "assets.create_template", skip_all)]
    pub async fn create_template(
        &self,
        ctx: &RequestContext,
        input: TemplateInput,
    ) -> Result<Template, AssetError> {
        input.validate()?;
        let schema = serde_json::to_value(&input.metadata_schema).expect("schema serializes");
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.create_template").await?;
        let row = tx
            .typed_query_one(
                &format!(
                    "INSERT INTO dalp_assets.templates (organisation_id, slug, name, base_type, asset_class, features, metadata_schema, updated_by)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
                ),
                &[&input.organisation_id, &input.slug, &input.name.trim(), &input.base_type.as_str(), &input.asset_class.as_str(),
                  &input.features, &schema, &ctx.actor],
            )
            .await?;
        let t = template_from(&row);
        Self::template_change(&mut tx, ctx, &t, None, "assets.template.create").await?;
        tx.commit().await?;
        Ok(t)
    }

    #[tracing::instrument(target = "dalp_store", name = "assets.template", skip_all)]
    pub async fn template(&self, id: Uuid) -> Result<Template, AssetError> {
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        let row = client
            .typed_query_opt(
                &format!("SELECT {COLUMNS} FROM dalp_assets.templates WHERE id = $1"),
                &[&id],
            )
            .await?
            .ok_or(AssetError::NotFound("template"))?;
        Ok(template_from(&row))
    }

    /// Replaces a template (If-Match `expected_version`); a published one may only be renamed.
    #[tracing::instrument(target = "dalp_store", name = "assets.update_template", skip_all)]
    pub async fn update_template(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        expected_version: i32,
        input: TemplateInput,
    ) -> Result<Template, AssetError> {
        input.validate()?;
        let schema = serde_json::to_value(&input.metadata_schema).expect("schema serializes");
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.update_template").await?;
        let cur = tx
            .typed_query_opt(&format!("SELECT {COLUMNS}, to_jsonb(t) FROM dalp_assets.templates t WHERE id = $1 FOR UPDATE"), &[&id])
            .await?
            .ok_or(AssetError::NotFound("template"))?;
        let current = template_from(&cur);
        if current.version != expected_version {
            return Err(AssetError::Conflict {
                id,
                expected: expected_version,
                current: current.version,
            });
        }
        if current.status == "published"
            && (current.slug != input.slug
                || current.base_type != input.base_type.as_str()
                || current.asset_class != input.asset_class.as_str()
                || current.features != input.features
                || current.metadata_schema != schema
                || current.organisation_id != input.organisation_id)
        {
            return Err(AssetError::TemplatePublished(current.slug));
        }
        let row = tx
            .typed_query_one(
                &format!(
                    "UPDATE dalp_assets.templates SET organisation_id = $2, slug = $3, name = $4, base_type = $5, asset_class = $6,
                         features = $7, metadata_schema = $8, updated_by = $9, updated_at = now(), version = version + 1
                     WHERE id = $1 RETURNING {COLUMNS}"
                ),
                &[&id, &input.organisation_id, &input.slug, &input.name.trim(), &input.base_type.as_str(), &input.asset_class.as_str(),
                  &input.features, &schema, &ctx.actor],
            )
            .await?;
        let t = template_from(&row);
        Self::template_change(
            &mut tx,
            ctx,
            &t,
            Some(cur.get(10)),
            "assets.template.update",
        )
        .await?;
        tx.commit().await?;
        Ok(t)
    }

    #[tracing::instrument(target = "dalp_store", name = "assets.publish_template", skip_all)]
    pub async fn publish_template(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        expected_version: i32,
    ) -> Result<Template, AssetError> {
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.publish_template").await?;
        let cur = tx
            .typed_query_opt("SELECT version, status, to_jsonb(t) FROM dalp_assets.templates t WHERE id = $1 FOR UPDATE", &[&id])
            .await?
            .ok_or(AssetError::NotFound("template"))?;
        let (version, status): (i32, String) = (cur.get(0), cur.get(1));
        if version != expected_version {
            return Err(AssetError::Conflict {
                id,
                expected: expected_version,
                current: version,
            });
        }
        if status == "published" {
            return Err(AssetError::NotPending("published".into()));
        }
        let row = tx
            .typed_query_one(
                &format!("UPDATE dalp_assets.templates SET status = 'published', updated_by = $2, updated_at = now(), version = version + 1 WHERE id = $1 RETURNING {COLUMNS}"),
                &[&id, &ctx.actor],
            )
            .await?;
        let t = template_from(&row);
        Self::template_change(
            &mut tx,
            ctx,
            &t,
            Some(cur.get(2)),
            "assets.template.publish",
        )
        .await?;
        tx.commit().await?;
        Ok(t)
    }

    /// Templates an organisation may use: system and its own, minus those it hid.
    #[tracing::instrument(target = "dalp_store", name = "assets.templates_for", skip_all)]
    pub async fn templates_for(&self, org: Uuid) -> Result<Vec<Template>, AssetError> {
        let client = dalp_db::pool::checkout(self.pool(), "assets").await?;
        let rows = client
            .typed_query(
                &format!(
                    "SELECT {COLUMNS} FROM dalp_assets.templates t
                      WHERE (t.organisation_id IS NULL OR t.organisation_id = $1)
                        AND NOT EXISTS (SELECT 1 FROM dalp_assets.template_hidden h WHERE h.organisation_id = $1 AND h.template_id = t.id)
                      ORDER BY t.slug"
                ),
                &[&org],
            )
            .await?;
        Ok(rows.iter().map(template_from).collect())
    }

    /// Hides (or shows again) a template for one organisation.
    #[tracing::instrument(target = "dalp_store", name = "assets.set_template_hidden", skip_all)]
    pub async fn set_template_hidden(
        &self,
        ctx: &RequestContext,
        org: Uuid,
        id: Uuid,
        hidden: bool,
    ) -> Result<(), AssetError> {
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("assets.set_template_hidden").await?;
        if tx
            .typed_query_opt("SELECT 1 FROM dalp_assets.templates WHERE id = $1", &[&id])
            .await?
            .is_none()
        {
            return Err(AssetError::NotFound("template"));
        }
        if hidden {
            tx.typed_execute(
                "INSERT INTO dalp_assets.template_hidden VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&org, &id],
            )
            .await?;
        } else {
            tx.typed_execute("DELETE FROM dalp_assets.template_hidden WHERE organisation_id = $1 AND template_id = $2", &[&org, &id]).await?;
        }
        tx.record(
            &ctx.event("assets.template.visibility", "template")
                .resource(id)
                .details(json!({ "organisation_id": org, "hidden": hidden })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The published template an asset refers to, checked against the asset's base type,
    /// and its metadata validated (immutable fields against `previous`).
    pub(crate) async fn check_template(
        &self,
        template_id: Uuid,
        base_type: BaseType,
        metadata: &Value,
        previous: Option<&Value>,
    ) -> Result<(), AssetError> {
        let t = self.template(template_id).await.map_err(|e| match e {
            AssetError::NotFound(_) => Invalid::new("template_id", "no such template").into(),
            e => e,
        })?;
        if t.status != "published" {
            return Err(Invalid::new("template_id", "the template is not published yet").into());
        }
        if t.base_type != base_type.as_str() {
            return Err(
                Invalid::new("base_type", format!("the template is for {}", t.base_type)).into(),
            );
        }
        let schema: Vec<FieldSpec> = serde_json::from_value(t.metadata_schema).map_err(|e| {
            AssetError::Internal(format!("template {template_id} metadata schema: {e}"))
        })?;
        validate_metadata(&schema, metadata, previous)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Vec<FieldSpec> {
        serde_json::from_value(json!([
            { "key": "face_value", "label": "Face value", "type": "decimal", "required": true, "mutable": false, "constraints": { "min": "0.01" } },
            { "key": "maturity_date", "label": "Maturity", "type": "date", "required": true },
            { "key": "management_fee_bps", "label": "Fee", "type": "integer", "constraints": { "min": "0", "max": "10000" } },
            { "key": "category", "label": "Category", "type": "string", "constraints": { "enum": ["green", "social"] } }
        ]))
        .unwrap()
    }

    #[test]
    fn metadata_follows_the_schema() {
        let s = schema();
        let good = json!({ "face_value": "100.00", "maturity_date": "2030-12-31", "management_fee_bps": 50, "category": "green" });
        validate_metadata(&s, &good, None).unwrap();
        for (bad, why) in [
            (json!({ "maturity_date": "2030-12-31" }), "face_value"),
            (
                json!({ "face_value": 100.0, "maturity_date": "2030-12-31" }),
                "decimal",
            ),
            (
                json!({ "face_value": "100", "maturity_date": "31/12/2030" }),
                "maturity_date",
            ),
            (
                json!({ "face_value": "100", "maturity_date": "2030-12-31", "management_fee_bps": 10001 }),
                "out of range",
            ),
            (
                json!({ "face_value": "100", "maturity_date": "2030-12-31", "category": "brown" }),
                "one of",
            ),
            (
                json!({ "face_value": "100", "maturity_date": "2030-12-31", "colour": "red" }),
                "not a field",
            ),
        ] {
            let e = validate_metadata(&s, &bad, None).unwrap_err();
            assert_eq!(e.field, "metadata");
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
        let changed = json!({ "face_value": "200.00", "maturity_date": "2030-12-31" });
        let e = validate_metadata(&s, &changed, Some(&good)).unwrap_err();
        assert!(e.message.contains("cannot change"), "{}", e.message);
    }
}
