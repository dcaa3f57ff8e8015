//! Users: creation, profile changes, deletion, passwords and platform roles.

use super::*;

impl IdentityStore {
    #[tracing::instrument(target = "dalp_store", name = "identity.create_user", skip_all)]
    pub async fn create_user(&self, ctx: &RequestContext, new: NewUser) -> Result<User> {
        let name = parse_name("name", &new.name)?;
        // A role listed twice is a mistake in the request, not an email conflict.
        if let Some(r) = new
            .roles
            .iter()
            .enumerate()
            .find(|(i, r)| new.roles[..*i].contains(r))
            .map(|(_, r)| r)
        {
            return Err(Invalid {
                field: "roles",
                message: format!("lists {} more than once", r.as_str()),
            }
            .into());
        }
        let hash = match &new.password {
            Some(p) => Some(hash_password(p).await?),
            None => None,
        };
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.create_user").await?;
        let id: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.users (email, name, wallet_address) VALUES ($1, $2, $3) RETURNING id",
                &[&new.email.as_str(), &name, &new.wallet_address.as_ref().map(|w| w.lower())],
            )
            .await?
            .get(0);
        if let Some(h) = hash {
            tx.typed_execute(
                "INSERT INTO dalp_identity.password_credentials (user_id, hash) VALUES ($1, $2)",
                &[&id, &h],
            )
            .await?;
        }
        for role in &new.roles {
            tx.typed_execute(
                "INSERT INTO dalp_identity.platform_roles (user_id, role, granted_by) VALUES ($1, $2, $3)",
                &[&id, &role.as_str(), &ctx.actor],
            )
            .await?;
        }
        let roles: Vec<&str> = new.roles.iter().map(|r| r.as_str()).collect();
        tx.record(
            &ctx.event("identity.user.create", "user")
                .resource(id)
                .details(json!({ "roles": roles, "password_set": new.password.is_some() })),
        )
        .await?;
        let user = Self::user_in(&tx, id).await?;
        tx.commit().await?;
        Ok(user)
    }

    pub(super) async fn user_in(tx: &Transaction<'_>, id: Uuid) -> Result<User> {
        let row = tx
            .typed_query_opt(
                &format!("SELECT {USER_COLUMNS} FROM dalp_identity.users u WHERE u.id = $1"),
                &[&id],
            )
            .await?
            .ok_or(IdentityError::NotFound("user"))?;
        Ok(user_from(&row))
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.get_user", skip_all)]
    /// One user, served from the cache when possible (every change to a user invalidates
    /// `user:<id>` in every process).
    pub async fn get_user(&self, id: Uuid) -> Result<User> {
        let key = format!("user:{id}");
        if let Some(Cached::User(u)) = self.cache.get(&key) {
            return Ok(u);
        }
        let generation = self.cache.generation();
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                &format!("SELECT {USER_COLUMNS} FROM dalp_identity.users u WHERE u.id = $1"),
                &[&id],
            )
            .await?
            .ok_or(IdentityError::NotFound("user"))?;
        let user = user_from(&row);
        self.cache.insert(
            key.clone(),
            Cached::User(user.clone()),
            vec![key],
            generation,
        );
        Ok(user)
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.find_user_by_email", skip_all)]
    pub async fn find_user_by_email(&self, email: &Email) -> Result<Option<User>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                &format!("SELECT {USER_COLUMNS} FROM dalp_identity.users u WHERE u.email = $1"),
                &[&email.as_str()],
            )
            .await?;
        Ok(row.as_ref().map(user_from))
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.list_users", skip_all)]
    pub async fn list_users(&self, limit: i64, offset: i64) -> Result<Vec<User>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let rows = client
            .typed_query(
                &format!("SELECT {USER_COLUMNS} FROM dalp_identity.users u ORDER BY u.created_at, u.id LIMIT $1 OFFSET $2"),
                &[&limit, &offset],
            )
            .await?;
        Ok(rows.iter().map(user_from).collect())
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.update_user", skip_all)]
    pub async fn update_user(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        patch: UserPatch,
    ) -> Result<User> {
        let name = patch
            .name
            .as_deref()
            .map(|n| parse_name("name", n))
            .transpose()?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.update_user").await?;
        let exists = tx
            .typed_query_opt(
                "SELECT 1 FROM dalp_identity.users WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?;
        if exists.is_none() {
            return Err(IdentityError::NotFound("user"));
        }
        let mut changed = Vec::new();
        if let Some(n) = &name {
            tx.typed_execute(
                "UPDATE dalp_identity.users SET name = $2, updated_at = now() WHERE id = $1",
                &[&id, n],
            )
            .await?;
            changed.push("name");
        }
        if let Some(w) = &patch.wallet_address {
            tx.typed_execute(
                "UPDATE dalp_identity.users SET wallet_address = $2, updated_at = now() WHERE id = $1",
                &[&id, &w.as_ref().map(|w| w.lower())],
            )
            .await?;
            changed.push("wallet_address");
        }
        if let Some((reason, until)) = &patch.ban {
            if reason.chars().count() > 500 {
                return Err(Invalid {
                    field: "banned_reason",
                    message: "at most 500 characters".into(),
                }
                .into());
            }
            // A ban that has already ended would read as banned yet not be in effect.
            if until.is_some_and(|u| u <= Utc::now()) {
                return Err(Invalid {
                    field: "until",
                    message: "must be in the future (leave it out for a ban without end; `unban` lifts one)".into(),
                }
                .into());
            }
            tx.typed_execute(
                "UPDATE dalp_identity.users SET banned = true, banned_reason = $2, banned_until = $3, updated_at = now() WHERE id = $1",
                &[&id, reason, until],
            )
            .await?;
            changed.push("banned");
        } else if patch.unban {
            tx.typed_execute(
                "UPDATE dalp_identity.users SET banned = false, banned_reason = NULL, banned_until = NULL, updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await?;
            changed.push("banned");
        }
        tx.record(
            &ctx.event("identity.user.update", "user")
                .resource(id)
                .details(json!({ "fields": changed })),
        )
        .await?;
        let user = Self::user_in(&tx, id).await?;
        tx.invalidate(vec![format!("user:{id}")]);
        tx.commit().await?;
        Ok(user)
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.delete_user", skip_all)]
    pub async fn delete_user(&self, ctx: &RequestContext, id: Uuid) -> Result<()> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.delete_user").await?;
        let n = tx
            .typed_execute("DELETE FROM dalp_identity.users WHERE id = $1", &[&id])
            .await?;
        if n == 0 {
            return Err(IdentityError::NotFound("user"));
        }
        tx.record(&ctx.event("identity.user.delete", "user").resource(id))
            .await?;
        tx.invalidate(vec![format!("user:{id}")]);
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.set_password", skip_all)]
    pub async fn set_password(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        password: &Password,
    ) -> Result<()> {
        let hash = hash_password(password).await?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.set_password").await?;
        tx.typed_execute(
            "INSERT INTO dalp_identity.password_credentials (user_id, hash) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET hash = EXCLUDED.hash, updated_at = now()",
            &[&id, &hash],
        )
        .await?;
        tx.record(&ctx.event("identity.password.set", "user").resource(id))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.grant_role", skip_all)]
    pub async fn grant_role(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        role: PlatformRole,
    ) -> Result<User> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.grant_role").await?;
        if tx
            .typed_query_opt("SELECT 1 FROM dalp_identity.users WHERE id = $1", &[&id])
            .await?
            .is_none()
        {
            return Err(IdentityError::NotFound("user"));
        }
        let n = tx
            .typed_execute(
                "INSERT INTO dalp_identity.platform_roles (user_id, role, granted_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&id, &role.as_str(), &ctx.actor],
            )
            .await?;
        let user = Self::user_in(&tx, id).await?;
        if n == 0 {
            tx.commit_unaudited("the user already had this role: nothing changed")
                .await?;
            return Ok(user);
        }
        tx.record(
            &ctx.event("identity.role.grant", "user")
                .resource(id)
                .details(json!({ "role": role.as_str() })),
        )
        .await?;
        tx.invalidate(vec![format!("user:{id}")]);
        tx.commit().await?;
        Ok(user)
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.revoke_role", skip_all)]
    pub async fn revoke_role(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        role: PlatformRole,
    ) -> Result<User> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.revoke_role").await?;
        let n = tx
            .typed_execute(
                "DELETE FROM dalp_identity.platform_roles WHERE user_id = $1 AND role = $2",
                &[&id, &role.as_str()],
            )
            .await?;
        if n == 0 {
            return Err(IdentityError::NotFound("role grant"));
        }
        tx.record(
            &ctx.event("identity.role.revoke", "user")
                .resource(id)
                .details(json!({ "role": role.as_str() })),
        )
        .await?;
        let user = Self::user_in(&tx, id).await?;
        tx.invalidate(vec![format!("user:{id}")]);
        tx.commit().await?;
        Ok(user)
    }
}
