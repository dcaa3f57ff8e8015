//! The only code that touches `dalp_assets`. Change control: every insert, update and delete
//! writes a version row (who, when, before, after) and an audit record in the same
//! transaction, and updates are optimistic — the caller names the version it read, and a
//! stale version changes nothing and fails with [`AssetError::Conflict`].

use dalp_db::TypedClient;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use dalp_audit::RequestContext;
use dalp_db::cache::{Invalidate, InvalidatingCache};
use dalp_db::{WriteError, Writer};
use dalp_types::Invalid;
use deadpool_postgres::{Pool, Transaction};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::types::AssetSpec;
use crate::types::OrgSettings;

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// What was looked for: asset, template, compliance change, …
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("asset {id} is at version {current}, not {expected}: read it again and retry")]
    Conflict {
        id: Uuid,
        expected: i32,
        current: i32,
    },
    #[error("{0}")]
    Duplicate(String),
    #[error("the proposer of a change cannot approve it: a second person must")]
    FourEyes,
    #[error("template {0} is published: its key fields cannot change (only its name)")]
    TemplatePublished(String),
    #[error("this change is {0}, not pending")]
    NotPending(String),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Write(WriteError),
    #[error("stored data is unreadable: {0}")]
    Internal(String),
}

impl From<tokio_postgres::Error> for AssetError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            // Say which uniqueness rule: a duplicate template slug is not an ISIN clash.
            let constraint = e
                .as_db_error()
                .and_then(|d| d.constraint())
                .unwrap_or_default();
            AssetError::Duplicate(
                match constraint {
                    "assets_isin_key" => "an asset with this ISIN already exists",
                    "assets_contract_unique" => {
                        "an asset with this contract address on this chain already exists"
                    }
                    "templates_organisation_id_slug_key" => {
                        "a template with this slug already exists in this organisation"
                    }
                    "fx_rates_pkey" => "a rate for this pair, provider and time already exists",
                    _ => "this already exists",
                }
                .into(),
            )
        } else {
            AssetError::Db(e)
        }
    }
}

impl From<WriteError> for AssetError {
    fn from(e: WriteError) -> Self {
        match e {
            // A deferred constraint fails at commit: the same mapping as any statement.
            WriteError::Db(e) => e.into(),
            e => AssetError::Write(e),
        }
    }
}

type Result<T> = std::result::Result<T, AssetError>;

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Asset {
    pub id: Uuid,
    pub organisation_id: Uuid,
    pub name: String,
    pub symbol: String,
    pub decimals: i16,
    pub base_type: String,
    pub isin: Option<String>,
    pub country_numeric: Option<i16>,
    pub chain_id: Option<i64>,
    pub contract_address: Option<String>,
    /// `draft` or `published`.
    pub status: String,
    pub template_id: Option<Uuid>,
    pub metadata: Value,
    pub details: Value,
    /// Send this back with an update (optimistic concurrency).
    pub version: i32,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AssetVersion {
    pub version: i32,
    pub operation: String,
    pub changed_by: String,
    pub changed_at: DateTime<Utc>,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

const COLUMNS: &str =
    "id, organisation_id, name, symbol, decimals, base_type, isin, country_numeric, chain_id, \
     contract_address, version, updated_at, updated_by, status, template_id, metadata, details";

fn asset_from(r: &Row) -> Asset {
    Asset {
        id: r.get(0),
        organisation_id: r.get(1),
        name: r.get(2),
        symbol: r.get(3),
        decimals: r.get(4),
        base_type: r.get(5),
        isin: r.get(6),
        country_numeric: r.get(7),
        chain_id: r.get(8),
        contract_address: r.get(9),
        version: r.get(10),
        updated_at: r.get(11),
        updated_by: r.get(12),
        status: r.get(13),
        template_id: r.get(14),
        metadata: r.get(15),
        details: r.get(16),
    }
}

/// Records whose versions [`AssetStore::versions_of`] lists.
#[derive(Debug, Clone, Copy)]
pub enum VersionedKind {
    Template,
    Settings,
    Compliance,
}

/// NOTIFY channel of asset-domain cache invalidations.
pub const CACHE_CHANNEL: &str = "dalp_assets_cache";

/// What the asset-domain cache holds.
#[derive(Debug, Clone)]
pub enum Cached {
    Settings(OrgSettings),
    Asset(Asset),
}

/// The values INSERT and UPDATE both bind as `$2`..`$13`, after a key in `$1`
/// (organisation id for an insert, asset id for an update).
struct Bind<'a> {
    base_type: &'static str,
    isin: Option<&'a str>,
    chain_id: Option<i64>,
    address: Option<String>,
}

impl<'a> Bind<'a> {
    fn of(spec: &'a AssetSpec) -> Bind<'a> {
        Bind {
            base_type: spec.base_type.as_str(),
            isin: spec.isin.as_ref().map(|i| i.as_str()),
            chain_id: spec.contract.as_ref().map(|(c, _)| c.get()),
            address: spec.contract.as_ref().map(|(_, a)| a.lower()),
        }
    }

    fn params(
        &'a self,
        key: &'a Uuid,
        spec: &'a AssetSpec,
        actor: &'a String,
    ) -> [&'a (dyn ToSql + Sync); 13] {
        [
            key,
            &spec.name,
            &spec.symbol,
            &spec.decimals,
            &self.base_type,
            &self.isin,
            &spec.country_numeric,
            &self.chain_id,
            &self.address,
            actor,
            &spec.template_id,
            &spec.metadata,
            &spec.details,
        ]
    }
}

/// The asset store, as `dalp_assets_svc`, with its cache of organisation settings.
#[derive(Clone)]
pub struct AssetStore {
    pool: Pool,
    /// Every change; it sends one NOTIFY on [`CACHE_CHANNEL`] with the
    /// entries a change replaces and evicts them here at commit.
    writer: Writer,
    cache: Arc<InvalidatingCache<Cached>>,
}

impl AssetStore {
    /// A store whose cache serves nothing (no listener): every read goes to the database.
    pub fn new(pool: Pool) -> AssetStore {
        AssetStore::with_cache(pool, InvalidatingCache::new(1))
    }

    /// A store reading settings through `cache`, which a listener on
    /// [`CACHE_CHANNEL`] keeps correct.
    pub fn with_cache(pool: Pool, cache: Arc<InvalidatingCache<Cached>>) -> AssetStore {
        let writer = Writer::new(pool.clone(), "assets")
            .invalidating(CACHE_CHANNEL, cache.clone() as Arc<dyn Invalidate>);
        AssetStore {
            pool,
            writer,
            cache,
        }
    }

    pub(crate) fn writer(&self) -> &Writer {
        &self.writer
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn cache(&self) -> &Arc<InvalidatingCache<Cached>> {
        &self.cache
    }

    /// The version row and the audit record of one change, in the caller's transaction.
    async fn record_change(
        tx: &mut dalp_db::write::Write<'_>,
        ctx: &RequestContext,
        id: Uuid,
        version: i32,
        operation: &'static str,
        before: Option<Value>,
    ) -> Result<()> {
        tx.typed_execute(
            "INSERT INTO dalp_assets.asset_versions (asset_id, version, operation, changed_by, before, after)
             VALUES ($1, $2, $3, $4, $5, (SELECT to_jsonb(a) FROM dalp_assets.assets a WHERE a.id = $1))",
            &[&id, &version, &operation, &ctx.actor, &before],
        )
        .await?;
        let action = match operation {
            "insert" => "assets.asset.create",
            "update" => "assets.asset.update",
            _ => "assets.asset.delete",
        };
        tx.record(
            &ctx.event(action, "asset")
                .resource(id)
                .details(json!({ "version": version })),
        )
        .await?;
        Ok(())
    }

    #[tracing::instrument(target = "dalp_store", name = "assets.create", skip_all)]
    pub async fn create(&self, ctx: &RequestContext, spec: &AssetSpec) -> Result<Asset> {
        if let Some(t) = spec.template_id {
            self.check_template(t, spec.base_type, &spec.metadata, None)
                .await?;
        }
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("assets.create").await?;
        let bind = Bind::of(spec);
        let row = tx
            .typed_query_one(
                &format!(
                    "INSERT INTO dalp_assets.assets (organisation_id, name, symbol, decimals, base_type, isin, country_numeric,
                         chain_id, contract_address, updated_by, template_id, metadata, details)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING {COLUMNS}"
                ),
                &bind.params(&spec.organisation_id, spec, &ctx.actor),
            )
            .await?;
        let asset = asset_from(&row);
        Self::record_change(&mut tx, ctx, asset.id, 1, "insert", None).await?;
        tx.commit().await?;
        Ok(asset)
    }

    /// One asset, served from the cache when possible.
    #[tracing::instrument(target = "dalp_store", name = "assets.get", skip_all)]
    pub async fn get(&self, id: Uuid) -> Result<Asset> {
        let key = format!("asset:{id}");
        if let Some(Cached::Asset(a)) = self.cache.get(&key) {
            return Ok(a);
        }
        let generation = self.cache.generation();
        let asset = self.get_uncached(id).await?;
        self.cache.insert(
            key.clone(),
            Cached::Asset(asset.clone()),
            vec![key],
            generation,
        );
        Ok(asset)
    }

    async fn get_uncached(&self, id: Uuid) -> Result<Asset> {
        let client = dalp_db::pool::checkout(&self.pool, "assets").await?;
        let row = client
            .typed_query_opt(
                &format!("SELECT {COLUMNS} FROM dalp_assets.assets WHERE id = $1"),
                &[&id],
            )
            .await?
            .ok_or(AssetError::NotFound("asset"))?;
        Ok(asset_from(&row))
    }

    /// Locks the row and checks the caller read the current version.
    async fn lock_at(tx: &Transaction<'_>, id: Uuid, expected: i32) -> Result<Value> {
        let row = tx
            .typed_query_opt(
                "SELECT version, to_jsonb(a) FROM dalp_assets.assets a WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or(AssetError::NotFound("asset"))?;
        let current: i32 = row.get(0);
        if current != expected {
            return Err(AssetError::Conflict {
                id,
                expected,
                current,
            });
        }
        Ok(row.get(1))
    }

    /// Replaces the definition, if `expected_version` is still current.
    #[tracing::instrument(target = "dalp_store", name = "assets.update", skip_all)]
    pub async fn update(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        expected_version: i32,
        spec: &AssetSpec,
    ) -> Result<Asset> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("assets.update").await?;
        let before = Self::lock_at(&tx, id, expected_version).await?;
        if let Some(t) = spec.template_id {
            let previous =
                (before["template_id"] == serde_json::json!(t)).then(|| &before["metadata"]);
            self.check_template(t, spec.base_type, &spec.metadata, previous)
                .await?;
        }
        let bind = Bind::of(spec);
        let row = tx
            .typed_query_one(
                &format!(
                    "UPDATE dalp_assets.assets SET name = $2, symbol = $3, decimals = $4, base_type = $5, isin = $6,
                         country_numeric = $7, chain_id = $8, contract_address = $9, updated_by = $10,
                         template_id = $11, metadata = $12, details = $13, updated_at = now(), version = version + 1
                     WHERE id = $1 RETURNING {COLUMNS}"
                ),
                &bind.params(&id, spec, &ctx.actor),
            )
            .await?;
        let asset = asset_from(&row);
        Self::record_change(&mut tx, ctx, id, asset.version, "update", Some(before)).await?;
        tx.invalidate([format!("asset:{id}")]);
        tx.commit().await?;
        Ok(asset)
    }

    /// Deletes the asset, if `expected_version` is still current; history stays.
    #[tracing::instrument(target = "dalp_store", name = "assets.delete", skip_all)]
    pub async fn delete(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        expected_version: i32,
    ) -> Result<()> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("assets.delete").await?;
        let before = Self::lock_at(&tx, id, expected_version).await?;
        tx.typed_execute("DELETE FROM dalp_assets.assets WHERE id = $1", &[&id])
            .await?;
        Self::record_change(
            &mut tx,
            ctx,
            id,
            expected_version + 1,
            "delete",
            Some(before),
        )
        .await?;
        tx.invalidate([format!("asset:{id}")]);
        tx.commit().await?;
        Ok(())
    }

    /// Assets, optionally of one organisation, oldest first.
    #[tracing::instrument(target = "dalp_store", name = "assets.list", skip_all)]
    pub async fn list(
        &self,
        organisation: Option<Uuid>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Asset>> {
        let client = dalp_db::pool::checkout(&self.pool, "assets").await?;
        let rows = client
            .typed_query(
                &format!(
                    "SELECT {COLUMNS} FROM dalp_assets.assets WHERE ($1::uuid IS NULL OR organisation_id = $1)
                      ORDER BY created_at, id LIMIT $2 OFFSET $3"
                ),
                &[&organisation, &limit, &offset],
            )
            .await?;
        Ok(rows.iter().map(asset_from).collect())
    }

    /// Sets the lifecycle status (versioned and audited like any change).
    pub(crate) async fn set_status(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        expected_version: i32,
        status: &str,
    ) -> Result<Asset> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("assets.list").await?;
        let before = Self::lock_at(&tx, id, expected_version).await?;
        let row = tx
            .typed_query_one(
                &format!(
                    "UPDATE dalp_assets.assets SET status = $2, updated_by = $3, updated_at = now(), version = version + 1
                     WHERE id = $1 RETURNING {COLUMNS}"
                ),
                &[&id, &status, &ctx.actor],
            )
            .await?;
        let asset = asset_from(&row);
        Self::record_change(&mut tx, ctx, id, asset.version, "update", Some(before)).await?;
        tx.invalidate([format!("asset:{id}")]);
        tx.commit().await?;
        Ok(asset)
    }

    /// The version rows of one templated, settings or compliance record, oldest first.
    #[tracing::instrument(target = "dalp_store", name = "assets.versions_of", skip_all)]
    pub async fn versions_of(&self, kind: VersionedKind, id: Uuid) -> Result<Vec<Value>> {
        let (table, key, what) = match kind {
            VersionedKind::Template => ("template_versions", "template_id", "template"),
            VersionedKind::Settings => ("settings_versions", "organisation_id", "settings"),
            VersionedKind::Compliance => (
                "compliance_versions",
                "asset_id",
                "compliance configuration",
            ),
        };
        let client = dalp_db::pool::checkout(&self.pool, "assets").await?;
        // Table and column names come from the match above, never from input.
        let rows = client
            .typed_query(
                &format!("SELECT to_jsonb(v) - '{key}' FROM dalp_assets.{table} v WHERE {key} = $1 ORDER BY version"),
                &[&id],
            )
            .await?;
        if rows.is_empty() {
            return Err(AssetError::NotFound(what));
        }
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Every version of an asset, oldest first (also after deletion).
    #[tracing::instrument(target = "dalp_store", name = "assets.history", skip_all)]
    pub async fn history(&self, id: Uuid) -> Result<Vec<AssetVersion>> {
        let client = dalp_db::pool::checkout(&self.pool, "assets").await?;
        let rows = client
            .typed_query(
                "SELECT version, operation, changed_by, changed_at, before, after FROM dalp_assets.asset_versions
                  WHERE asset_id = $1 ORDER BY version",
                &[&id],
            )
            .await?;
        if rows.is_empty() {
            return Err(AssetError::NotFound("asset"));
        }
        Ok(rows
            .iter()
            .map(|r| AssetVersion {
                version: r.get(0),
                operation: r.get(1),
                changed_by: r.get(2),
                changed_at: r.get(3),
                before: r.get(4),
                after: r.get(5),
            })
            .collect())
    }
}
