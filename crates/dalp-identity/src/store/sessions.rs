//! Login, sessions and their validation, denials audited on their own.

use super::*;

impl IdentityStore {
    /// Password login. Unknown email and wrong password give the same error after the same
    /// work. Users holding `admin`, or with TOTP enrolled, get a pending session that only
    /// the second factor can complete.
    #[tracing::instrument(target = "dalp_store", name = "identity.login", skip_all)]
    pub async fn login(
        &self,
        ctx: &RequestContext,
        email: &str,
        password: &str,
    ) -> Result<LoginResult> {
        let email = Email::parse(email).map_err(|_| IdentityError::InvalidCredentials)?;
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                "SELECT u.id, c.hash, u.banned, u.banned_until,
                        EXISTS (SELECT 1 FROM dalp_identity.platform_roles r WHERE r.user_id = u.id AND r.role = 'admin'),
                        EXISTS (SELECT 1 FROM dalp_identity.mfa_totp t WHERE t.user_id = u.id AND t.confirmed_at IS NOT NULL)
                   FROM dalp_identity.users u
                   LEFT JOIN dalp_identity.password_credentials c ON c.user_id = u.id
                  WHERE u.email = $1",
                &[&email.as_str()],
            )
            .await?;
        drop(client);
        let (user_id, hash) = match &row {
            Some(r) => (Some(r.get::<_, Uuid>(0)), r.get::<_, Option<String>>(1)),
            None => (None, None),
        };
        let ok = verify_password(
            hash.clone().unwrap_or_else(dummy_hash),
            password.to_string(),
        )
        .await
            && hash.is_some();
        let (Some(user_id), true, Some(row)) = (user_id, ok, row) else {
            self.audit_alone(
                ctx.event("identity.login", "user")
                    .outcome(Outcome::Denied)
                    .details(json!({ "reason": "invalid_credentials" })),
                user_id,
            )
            .await?;
            return Err(IdentityError::InvalidCredentials);
        };
        let (banned, until): (bool, Option<DateTime<Utc>>) = (row.get(2), row.get(3));
        if is_banned(banned, until) {
            self.audit_alone(
                ctx.event("identity.login", "user")
                    .outcome(Outcome::Denied)
                    .details(json!({ "reason": "banned" })),
                Some(user_id),
            )
            .await?;
            return Err(IdentityError::Banned { until });
        }
        let mfa_required: bool = row.get::<_, bool>(4) || row.get::<_, bool>(5);
        let now = Utc::now();
        let expires_at = now
            + if mfa_required {
                PENDING_TTL
            } else {
                SESSION_TTL
            };
        let token = random_token(SESSION_PREFIX);
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.login").await?;
        let session_id: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.sessions (user_id, token_hash, expires_at, refreshed_at, fresh_until, mfa_pending, ip, user_agent)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[&user_id, &token_hash(&token), &expires_at, &now, &(now + FRESH_FOR), &mfa_required, &ctx.ip, &ctx.user_agent],
            )
            .await?
            .get(0);
        if !mfa_required {
            tx.typed_execute(
                "UPDATE dalp_identity.users SET last_login_at = now() WHERE id = $1",
                &[&user_id],
            )
            .await?;
            tx.invalidate([format!("user:{user_id}")]);
        }
        let mut ev = ctx
            .event("identity.login", "session")
            .resource(session_id)
            .details(json!({ "mfa_pending": mfa_required }));
        ev.actor = format!("user:{user_id}");
        tx.record(&ev).await?;
        tx.commit().await?;
        Ok(LoginResult {
            token,
            session_id,
            expires_at,
            mfa_required,
        })
    }

    /// Records an audit event in a transaction of its own (for denials that change nothing).
    pub(super) async fn audit_alone(
        &self,
        mut event: AuditEvent,
        user: Option<Uuid>,
    ) -> Result<()> {
        if let Some(u) = user.filter(|_| event.resource_id.is_none()) {
            event.resource_id = Some(u.to_string());
        }
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.audit").await?;
        tx.record(&event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a denied access (missing role, wrong scope …) against the caller.
    #[tracing::instrument(target = "dalp_store", name = "identity.audit_denied", skip_all)]
    pub async fn audit_denied(
        &self,
        ctx: &RequestContext,
        action: &'static str,
        reason: &str,
    ) -> Result<()> {
        self.audit_alone(
            ctx.event(action, "request")
                .outcome(Outcome::Denied)
                .details(json!({ "reason": reason })),
            None,
        )
        .await
    }

    /// Resolves a bearer session token. Served from the cache when possible.
    #[tracing::instrument(target = "dalp_store", name = "identity.validate_session", skip_all)]
    pub async fn validate_session(&self, token: &str) -> Result<Principal> {
        if !token.starts_with(SESSION_PREFIX) || token.len() > 200 {
            return Err(IdentityError::Unauthenticated("invalid session token"));
        }
        let hash = token_hash(token);
        let key = format!("s:{}", hex::encode(&hash));
        let now = Utc::now();
        if let Some(Cached::Principal(p)) = self.cache.get(&key) {
            if let Credential::Session {
                expires_at,
                refreshed_at,
                ..
            } = &p.credential
            {
                if *expires_at <= now {
                    return Err(IdentityError::Unauthenticated(
                        "session expired: log in again",
                    ));
                }
                if now - *refreshed_at < SESSION_REFRESH_AFTER {
                    return Ok(p);
                }
            }
        }
        let generation = self.cache.generation();
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                "SELECT s.id, s.user_id, u.email, s.expires_at, s.fresh_until, s.refreshed_at, s.mfa_pending,
                        s.revoked_at, u.banned, u.banned_until,
                        coalesce(array(SELECT role FROM dalp_identity.platform_roles r WHERE r.user_id = u.id ORDER BY role), '{}')
                   FROM dalp_identity.sessions s JOIN dalp_identity.users u ON u.id = s.user_id
                  WHERE s.token_hash = $1",
                &[&hash],
            )
            .await?
            .ok_or(IdentityError::Unauthenticated("unknown session: log in again"))?;
        if row.get::<_, Option<DateTime<Utc>>>(7).is_some() {
            return Err(IdentityError::Unauthenticated(
                "session revoked: log in again",
            ));
        }
        let mut expires_at: DateTime<Utc> = row.get(3);
        if expires_at <= now {
            return Err(IdentityError::Unauthenticated(
                "session expired: log in again",
            ));
        }
        let until: Option<DateTime<Utc>> = row.get(9);
        if is_banned(row.get(8), until) {
            return Err(IdentityError::Banned { until });
        }
        let id: Uuid = row.get(0);
        let mfa_pending: bool = row.get(6);
        let mut refreshed_at: DateTime<Utc> = row.get(5);
        if !mfa_pending && now - refreshed_at >= SESSION_REFRESH_AFTER {
            expires_at = now + SESSION_TTL;
            refreshed_at = now;
            drop(client);
            let mut conn = self.writer.checkout().await?;
            let tx = conn.begin("identity.refresh_session").await?;
            tx.typed_execute(
                "UPDATE dalp_identity.sessions SET expires_at = $2, refreshed_at = $3 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &expires_at, &refreshed_at],
            )
            .await?;
            tx.commit_unaudited(
                "sliding expiry of a session; its creation and revocation are audited",
            )
            .await?;
        }
        let p = Principal {
            user_id: row.get(1),
            email: row.get(2),
            roles: roles_from(row.get(10)),
            credential: Credential::Session {
                id,
                expires_at,
                fresh_until: row.get(4),
                refreshed_at,
                mfa_pending,
            },
        };
        self.cache
            .insert(key, Cached::Principal(p.clone()), p.tags(), generation);
        Ok(p)
    }

    /// Resolves an API key. Served from the cache when possible.
    #[tracing::instrument(target = "dalp_store", name = "identity.validate_api_key", skip_all)]
    pub async fn validate_api_key(&self, key: &str) -> Result<Principal> {
        if !key.starts_with(API_KEY_PREFIX) || key.starts_with(SESSION_PREFIX) || key.len() > 200 {
            return Err(IdentityError::Unauthenticated("invalid API key"));
        }
        let hash = token_hash(key);
        let cache_key = format!("k:{}", hex::encode(&hash));
        let now = Utc::now();
        if let Some(Cached::Principal(p)) = self.cache.get(&cache_key) {
            if let Credential::ApiKey { expires_at, .. } = &p.credential {
                if expires_at.map(|e| e <= now).unwrap_or(false) {
                    return Err(IdentityError::Unauthenticated("API key expired"));
                }
                return Ok(p);
            }
        }
        let generation = self.cache.generation();
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                "SELECT k.id, k.user_id, u.email, k.scope, k.rate_limit_per_minute, k.expires_at, k.revoked_at,
                        u.banned, u.banned_until,
                        coalesce(array(SELECT role FROM dalp_identity.platform_roles r WHERE r.user_id = u.id ORDER BY role), '{}')
                   FROM dalp_identity.api_keys k JOIN dalp_identity.users u ON u.id = k.user_id
                  WHERE k.key_hash = $1",
                &[&hash],
            )
            .await?
            .ok_or(IdentityError::Unauthenticated("unknown API key"))?;
        if row.get::<_, Option<DateTime<Utc>>>(6).is_some() {
            return Err(IdentityError::Unauthenticated("API key revoked"));
        }
        let expires_at: Option<DateTime<Utc>> = row.get(5);
        if expires_at.map(|e| e <= now).unwrap_or(false) {
            return Err(IdentityError::Unauthenticated("API key expired"));
        }
        let until: Option<DateTime<Utc>> = row.get(8);
        if is_banned(row.get(7), until) {
            return Err(IdentityError::Banned { until });
        }
        let scope = Scope::parse(row.get::<_, &str>(3))?;
        let p = Principal {
            user_id: row.get(1),
            email: row.get(2),
            roles: roles_from(row.get(9)),
            credential: Credential::ApiKey {
                id: row.get(0),
                scope,
                rate_limit_per_minute: row.get(4),
                expires_at,
            },
        };
        self.cache.insert(
            cache_key,
            Cached::Principal(p.clone()),
            p.tags(),
            generation,
        );
        Ok(p)
    }

    pub(super) fn session_id(p: &Principal) -> Result<Uuid> {
        match &p.credential {
            Credential::Session { id, .. } => Ok(*id),
            Credential::ApiKey { .. } => Err(IdentityError::Forbidden(
                "this needs a session, not an API key".into(),
            )),
        }
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.logout", skip_all)]
    pub async fn logout(&self, ctx: &RequestContext, p: &Principal) -> Result<()> {
        let id = Self::session_id(p)?;
        self.revoke_session(ctx, p.user_id, id).await
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.list_sessions", skip_all)]
    pub async fn list_sessions(&self, p: &Principal) -> Result<Vec<SessionInfo>> {
        let current = Self::session_id(p).ok();
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let rows = client
            .typed_query(
                "SELECT id, created_at, expires_at, host(ip), user_agent, mfa_pending FROM dalp_identity.sessions
                  WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now() ORDER BY created_at DESC",
                &[&p.user_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SessionInfo {
                id: r.get(0),
                created_at: r.get(1),
                expires_at: r.get(2),
                ip: r.get(3),
                user_agent: r.get(4),
                mfa_pending: r.get(5),
                current: current == Some(r.get(0)),
            })
            .collect())
    }

    #[tracing::instrument(target = "dalp_store", name = "identity.revoke_session", skip_all)]
    pub async fn revoke_session(
        &self,
        ctx: &RequestContext,
        user_id: Uuid,
        session_id: Uuid,
    ) -> Result<()> {
        self.revoke(ctx, Revocable::Session, user_id, session_id)
            .await
    }

    /// Marks one of the user's sessions or API keys revoked, audits it, and evicts it from
    /// every process's cache when the transaction commits.
    pub(super) async fn revoke(
        &self,
        ctx: &RequestContext,
        what: Revocable,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<()> {
        let (sql, label, action, resource, tag) = match what {
            Revocable::Session => (
                "UPDATE dalp_identity.sessions SET revoked_at = now() WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
                "session",
                "identity.session.revoke",
                "session",
                "session",
            ),
            Revocable::ApiKey => (
                "UPDATE dalp_identity.api_keys SET revoked_at = now() WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
                "API key",
                "identity.api_key.revoke",
                "api_key",
                "api_key",
            ),
        };
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.revoke_session").await?;
        if tx.typed_execute(sql, &[&id, &user_id]).await? == 0 {
            return Err(IdentityError::NotFound(label));
        }
        tx.record(&ctx.event(action, resource).resource(id)).await?;
        tx.invalidate(vec![format!("{tag}:{id}")]);
        tx.commit().await?;
        Ok(())
    }
}
