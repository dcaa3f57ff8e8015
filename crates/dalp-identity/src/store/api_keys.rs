//! API keys: created once in plaintext, stored as hashes, validated and revoked.

use super::*;

impl IdentityStore {
    /// Creates a key; the plaintext is returned once and only its hash is stored.
    #[tracing::instrument(target = "dalp_store", name = "identity.create_api_key", skip_all)]
    pub async fn create_api_key(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        new: NewApiKey,
    ) -> Result<(String, ApiKeyInfo)> {
        let name = crate::types::parse_bounded_name(
            "name",
            &new.name,
            crate::types::API_KEY_NAME_MAX_CHARS,
        )?;
        if !(1..=100_000).contains(&new.rate_limit_per_minute) {
            return Err(Invalid {
                field: "rate_limit_per_minute",
                message: "must be 1 to 100000".into(),
            }
            .into());
        }
        if new.expires_at.map(|e| e <= Utc::now()).unwrap_or(false) {
            return Err(Invalid {
                field: "expires_in_days",
                message: "must be in the future".into(),
            }
            .into());
        }
        let key = random_token(API_KEY_PREFIX);
        let prefix = key[..API_KEY_PREFIX.len() + 8].to_string();
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.create_api_key").await?;
        let row = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.api_keys (user_id, name, prefix, key_hash, scope, rate_limit_per_minute, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id, created_at",
                &[&p.user_id, &name, &prefix, &token_hash(&key), &new.scope.as_str(), &new.rate_limit_per_minute, &new.expires_at],
            )
            .await?;
        let id: Uuid = row.get(0);
        tx.record(
            &ctx.event("identity.api_key.create", "api_key")
                .resource(id)
                .details(json!({ "scope": new.scope.as_str() })),
        )
        .await?;
        tx.commit().await?;
        Ok((
            key,
            ApiKeyInfo {
                id,
                name,
                prefix,
                scope: new.scope,
                rate_limit_per_minute: new.rate_limit_per_minute,
                expires_at: new.expires_at,
                created_at: row.get(1),
                revoked_at: None,
            },
        ))
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.list_api_keys", skip_all)]
    pub async fn list_api_keys(&self, user_id: Uuid) -> Result<Vec<ApiKeyInfo>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let rows = client
            .typed_query(
                "SELECT id, name, prefix, scope, rate_limit_per_minute, expires_at, created_at, revoked_at
                   FROM dalp_identity.api_keys WHERE user_id = $1 ORDER BY created_at",
                &[&user_id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiKeyInfo {
                    id: r.get(0),
                    name: r.get(1),
                    prefix: r.get(2),
                    scope: Scope::parse(r.get::<_, &str>(3))?,
                    rate_limit_per_minute: r.get(4),
                    expires_at: r.get(5),
                    created_at: r.get(6),
                    revoked_at: r.get(7),
                })
            })
            .collect()
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.revoke_api_key", skip_all)]
    pub async fn revoke_api_key(
        &self,
        ctx: &RequestContext,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<()> {
        self.revoke(ctx, Revocable::ApiKey, user_id, id).await
    }
}
