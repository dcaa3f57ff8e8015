//! The only code that touches `dalp_identity`. Every state change commits together with its
//! audit record, and sends at most one cache notification from inside its transaction.

use dalp_db::write::Write;
use dalp_db::{TypedClient, WriteError, Writer};
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Duration, Utc};
use dalp_audit::{AuditEvent, Outcome};
use dalp_db::cache::{self, InvalidatingCache};
use deadpool_postgres::{Pool, Transaction};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::crypto::{self, CryptoError, KeyProvider, WrappedKey};
use crate::totp;
use crate::types::{
    parse_name, Email, EvmAddress, Invalid, KycProfile, Password, PlatformRole, Scope,
};

/// NOTIFY channel of identity cache invalidations.
pub const CACHE_CHANNEL: &str = "dalp_identity_cache";
pub const SESSION_TTL: Duration = Duration::days(7);
pub const SESSION_REFRESH_AFTER: Duration = Duration::hours(24);
pub const FRESH_FOR: Duration = Duration::minutes(5);
/// A session waiting for its second factor lives this long.
pub const PENDING_TTL: Duration = Duration::minutes(10);
/// Wrong second-factor codes a pending session may send; the last one revokes it.
pub const MFA_SESSION_ATTEMPTS: i32 = 5;
/// Consecutive wrong second-factor codes (over all sessions) that lock the user out of
/// second-factor checks: for 1 minute, doubling with each further lockout, at most
/// [`MFA_MAX_LOCKOUT_MINUTES`], until a code is accepted.
pub const MFA_USER_ATTEMPTS: i32 = 5;
pub const MFA_MAX_LOCKOUT_MINUTES: i64 = 24 * 60;
pub const SESSION_PREFIX: &str = "dalps_";
pub const API_KEY_PREFIX: &str = "dalp_";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("email or password is wrong")]
    InvalidCredentials,
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("a second factor is required: POST /api/v1/auth/mfa/verify (or enrol TOTP first)")]
    MfaRequired,
    #[error("this operation needs a login within the last 5 minutes: log in again")]
    Reauthenticate,
    #[error("{0}")]
    Forbidden(String),
    #[error("account is banned{}", .until.map(|u| format!(" until {u}")).unwrap_or_default())]
    Banned { until: Option<DateTime<Utc>> },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("the code is wrong, expired or already used")]
    InvalidCode,
    #[error("{MFA_SESSION_ATTEMPTS} wrong codes: this login is revoked; log in again")]
    MfaSessionRevoked,
    #[error("too many wrong second-factor codes: checks are locked until {until}")]
    MfaLocked { until: DateTime<Utc> },
    #[error("encryption: {0}")]
    Crypto(#[from] CryptoError),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[source] tokio_postgres::Error),
    #[error("password hashing failed: {0}")]
    Hashing(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Write(WriteError),
}

impl From<WriteError> for IdentityError {
    fn from(e: WriteError) -> Self {
        match e {
            // A deferred constraint fails at commit: the same mapping as any statement.
            WriteError::Db(e) => e.into(),
            e => IdentityError::Write(e),
        }
    }
}

impl From<tokio_postgres::Error> for IdentityError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            IdentityError::Conflict("already exists (email or wallet address taken)".into())
        } else {
            IdentityError::Db(e)
        }
    }
}

type Result<T> = std::result::Result<T, IdentityError>;

/// What [`IdentityStore::revoke`] can revoke.
#[derive(Debug, Clone, Copy)]
enum Revocable {
    Session,
    ApiKey,
}

/// How a request authenticated.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    Session {
        id: Uuid,
        expires_at: DateTime<Utc>,
        fresh_until: DateTime<Utc>,
        refreshed_at: DateTime<Utc>,
        mfa_pending: bool,
    },
    ApiKey {
        id: Uuid,
        scope: Scope,
        rate_limit_per_minute: i32,
        expires_at: Option<DateTime<Utc>>,
    },
}

/// An authenticated caller.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Principal {
    pub user_id: Uuid,
    pub email: String,
    pub roles: Vec<PlatformRole>,
    pub credential: Credential,
}

impl Principal {
    /// The audit actor: the API key when one was used, else the user.
    pub fn actor(&self) -> String {
        match &self.credential {
            Credential::ApiKey { id, .. } => format!("api_key:{id}"),
            Credential::Session { .. } => format!("user:{}", self.user_id),
        }
    }

    pub fn has_role(&self, role: PlatformRole) -> bool {
        self.roles.contains(&role)
    }

    /// Fails unless authenticated within [`FRESH_FOR`] by a session.
    pub fn require_fresh(&self) -> Result<()> {
        match &self.credential {
            Credential::Session { fresh_until, .. } if *fresh_until > Utc::now() => Ok(()),
            _ => Err(IdentityError::Reauthenticate),
        }
    }

    fn tags(&self) -> Vec<String> {
        let mut tags = vec![format!("user:{}", self.user_id)];
        match &self.credential {
            Credential::Session { id, .. } => tags.push(format!("session:{id}")),
            Credential::ApiKey { id, .. } => tags.push(format!("api_key:{id}")),
        }
        tags
    }
}

pub use dalp_audit::RequestContext;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub wallet_address: Option<String>,
    pub banned: bool,
    pub banned_reason: Option<String>,
    pub banned_until: Option<DateTime<Utc>>,
    pub last_login_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub roles: Vec<PlatformRole>,
    pub mfa_enabled: bool,
}

pub struct NewUser {
    pub email: Email,
    pub name: String,
    pub password: Option<Password>,
    pub wallet_address: Option<EvmAddress>,
    pub roles: Vec<PlatformRole>,
}

#[derive(Default)]
pub struct UserPatch {
    pub name: Option<String>,
    pub wallet_address: Option<Option<EvmAddress>>,
    /// `Some((reason, until))` bans, `None` leaves as is; see `unban`.
    pub ban: Option<(String, Option<DateTime<Utc>>)>,
    pub unban: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LoginResult {
    pub token: String,
    pub session_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub mfa_required: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub mfa_pending: bool,
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub scope: Scope,
    pub rate_limit_per_minute: i32,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub struct NewApiKey {
    pub name: String,
    pub scope: Scope,
    pub expires_at: Option<DateTime<Utc>>,
    pub rate_limit_per_minute: i32,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TotpEnrolment {
    pub secret: String,
    pub otpauth_uri: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RotationReport {
    pub active_kek: String,
    pub rewrapped: u64,
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 32]>()))
}

fn argon2() -> Argon2<'static> {
    Argon2::default() // argon2id, m=19 MiB, t=2, p=1 (OWASP's baseline)
}

async fn hash_password(password: &Password) -> Result<String> {
    let p = password.expose().to_string();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16-byte salt");
        argon2()
            .hash_password(p.as_bytes(), &salt)
            .map(|h| h.to_string())
            .expect("argon2 hashing with valid parameters")
    })
    .await
    .map_err(IdentityError::Hashing)
}

async fn verify_password(hash: String, password: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// A real hash to verify against when the email is unknown, so timing does not reveal it.
fn dummy_hash() -> String {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| {
        let salt = SaltString::encode_b64(&[7u8; 16]).expect("salt");
        argon2()
            .hash_password(b"dalp-dummy-password", &salt)
            .expect("hash")
            .to_string()
    })
    .clone()
}

fn roles_from(v: Vec<String>) -> Vec<PlatformRole> {
    v.iter()
        .filter_map(|r| PlatformRole::parse(r).ok())
        .collect()
}

const USER_COLUMNS: &str = "u.id, u.email, u.name, u.wallet_address, u.banned, u.banned_reason, u.banned_until,
    u.last_login_at, u.created_at,
    coalesce(array(SELECT role FROM dalp_identity.platform_roles r WHERE r.user_id = u.id ORDER BY role), '{}'),
    EXISTS (SELECT 1 FROM dalp_identity.mfa_totp t WHERE t.user_id = u.id AND t.confirmed_at IS NOT NULL)";

fn user_from(row: &Row) -> User {
    User {
        id: row.get(0),
        email: row.get(1),
        name: row.get(2),
        wallet_address: row.get(3),
        banned: row.get(4),
        banned_reason: row.get(5),
        banned_until: row.get(6),
        last_login_at: row.get(7),
        created_at: row.get(8),
        roles: roles_from(row.get(9)),
        mfa_enabled: row.get(10),
    }
}

fn is_banned(banned: bool, until: Option<DateTime<Utc>>) -> bool {
    banned && until.map(|u| u > Utc::now()).unwrap_or(true)
}

/// The identity store: one pool (as `dalp_identity_svc`), the key provider and the cache.
#[derive(Clone)]
/// Every change goes through `writer`, which commits one NOTIFY on [`CACHE_CHANNEL`] with
/// the tags a change replaces and evicts them here at once, so the writing process never
/// serves its own stale entry while the notification travels.
pub struct IdentityStore {
    pool: Pool,
    writer: Writer,
    keys: Arc<dyn KeyProvider>,
    cache: Arc<InvalidatingCache<Principal>>,
}

impl IdentityStore {
    pub fn new(
        pool: Pool,
        keys: Arc<dyn KeyProvider>,
        cache: Arc<InvalidatingCache<Principal>>,
    ) -> IdentityStore {
        let writer = Writer::new(pool.clone(), "identity")
            .invalidating(CACHE_CHANNEL, cache.clone() as Arc<dyn cache::Invalidate>);
        IdentityStore {
            pool,
            writer,
            keys,
            cache,
        }
    }

    pub fn cache(&self) -> &Arc<InvalidatingCache<Principal>> {
        &self.cache
    }

    // ---- users ------------------------------------------------------------------------

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

    async fn user_in(tx: &Transaction<'_>, id: Uuid) -> Result<User> {
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
    pub async fn get_user(&self, id: Uuid) -> Result<User> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                &format!("SELECT {USER_COLUMNS} FROM dalp_identity.users u WHERE u.id = $1"),
                &[&id],
            )
            .await?
            .ok_or(IdentityError::NotFound("user"))?;
        Ok(user_from(&row))
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
        if n == 1 {
            tx.record(
                &ctx.event("identity.role.grant", "user")
                    .resource(id)
                    .details(json!({ "role": role.as_str() })),
            )
            .await?;
        }
        let user = Self::user_in(&tx, id).await?;
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

    /// Creates an organisation with `owner` as its owner; returns its id.
    #[tracing::instrument(target = "dalp_store", name = "identity.create_organisation", skip_all)]
    pub async fn create_organisation(
        &self,
        ctx: &RequestContext,
        slug: &str,
        name: &str,
        owner: Uuid,
    ) -> Result<Uuid> {
        let slug = dalp_types::parse_slug("slug", slug)?;
        let name = parse_name("name", name)?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.create_organisation").await?;
        let id: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.organisations (slug, name) VALUES ($1, $2) RETURNING id",
                &[&slug, &name],
            )
            .await?
            .get(0);
        tx.typed_execute(
            "INSERT INTO dalp_identity.organisation_members (organisation_id, user_id, role) VALUES ($1, $2, 'owner')",
            &[&id, &owner],
        )
        .await?;
        tx.record(
            &ctx.event("identity.organisation.create", "organisation")
                .resource(id)
                .details(json!({ "slug": slug })),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The id of the organisation with `slug`, if any.
    #[tracing::instrument(
        target = "dalp_store",
        name = "identity.organisation_by_slug",
        skip_all
    )]
    pub async fn organisation_by_slug(&self, slug: &str) -> Result<Option<Uuid>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        Ok(client
            .typed_query_opt(
                "SELECT id FROM dalp_identity.organisations WHERE slug = $1",
                &[&slug],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Whether an organisation has this id. Other domains reference organisations by id
    /// without reading this schema; the API asks here before it stores such a reference.
    #[tracing::instrument(target = "dalp_store", name = "identity.organisation_exists", skip_all)]
    pub async fn organisation_exists(&self, id: Uuid) -> Result<bool> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        Ok(client
            .typed_query_opt(
                "SELECT 1 FROM dalp_identity.organisations WHERE id = $1",
                &[&id],
            )
            .await?
            .is_some())
    }

    // ---- login and sessions -----------------------------------------------------------

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
    async fn audit_alone(&self, mut event: AuditEvent, user: Option<Uuid>) -> Result<()> {
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
        if let Some(p) = self.cache.get(&key) {
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
        self.cache.insert(key, p.clone(), p.tags(), generation);
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
        if let Some(p) = self.cache.get(&cache_key) {
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
        self.cache
            .insert(cache_key, p.clone(), p.tags(), generation);
        Ok(p)
    }

    fn session_id(p: &Principal) -> Result<Uuid> {
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
    async fn revoke(
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

    // ---- MFA --------------------------------------------------------------------------

    async fn load_totp(&self, user_id: Uuid) -> Result<Option<(Vec<u8>, bool, i64)>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                "SELECT d.kek_id, d.wrapped, t.secret_enc, t.confirmed_at IS NOT NULL, t.last_used_step
                   FROM dalp_identity.mfa_totp t JOIN dalp_identity.data_keys d ON d.id = t.data_key_id
                  WHERE t.user_id = $1",
                &[&user_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let dek = self
            .keys
            .unwrap(&WrappedKey {
                kek_id: row.get(0),
                blob: row.get(1),
            })
            .await?;
        let secret = crypto::open(&dek, row.get::<_, &[u8]>(2), totp_aad(user_id).as_bytes())?;
        Ok(Some((secret, row.get(3), row.get(4))))
    }

    /// Starts (or restarts, while unconfirmed) TOTP enrolment.
    #[tracing::instrument(target = "dalp_store", name = "identity.enroll_totp", skip_all)]
    pub async fn enroll_totp(&self, ctx: &RequestContext, p: &Principal) -> Result<TotpEnrolment> {
        if let Some((_, true, _)) = self.load_totp(p.user_id).await? {
            return Err(IdentityError::Conflict("TOTP is already enrolled".into()));
        }
        let secret = totp::generate_secret();
        let dek = crypto::new_dek();
        let wrapped = self.keys.wrap(&dek).await?;
        let enc = crypto::seal(&dek, &secret, totp_aad(p.user_id).as_bytes());
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.enroll_totp").await?;
        let dk: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.data_keys (kek_id, wrapped) VALUES ($1, $2) RETURNING id",
                &[&wrapped.kek_id, &wrapped.blob],
            )
            .await?
            .get(0);
        tx.typed_execute(
            "INSERT INTO dalp_identity.mfa_totp (user_id, data_key_id, secret_enc) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE SET data_key_id = EXCLUDED.data_key_id, secret_enc = EXCLUDED.secret_enc, last_used_step = 0",
            &[&p.user_id, &dk, &enc],
        )
        .await?;
        tx.record(&ctx.event("identity.mfa.enroll", "user").resource(p.user_id))
            .await?;
        tx.commit().await?;
        Ok(TotpEnrolment {
            secret: totp::secret_base32(&secret),
            otpauth_uri: totp::otpauth_uri(&secret, &p.email),
        })
    }

    /// Confirms enrolment with a first code; returns the one-time backup codes. A pending
    /// session (an admin's first login) is completed by it.
    #[tracing::instrument(target = "dalp_store", name = "identity.confirm_totp", skip_all)]
    pub async fn confirm_totp(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        code: &str,
    ) -> Result<Vec<String>> {
        let Some((secret, confirmed, last)) = self.load_totp(p.user_id).await? else {
            return Err(IdentityError::NotFound("TOTP enrolment"));
        };
        if confirmed {
            return Err(IdentityError::Conflict("TOTP is already enrolled".into()));
        }
        let step = totp::verify(&secret, code, Utc::now().timestamp() as u64, last as u64)
            .ok_or(IdentityError::InvalidCode)?;
        let codes = totp::generate_backup_codes();
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.confirm_totp").await?;
        tx.typed_execute(
            "UPDATE dalp_identity.mfa_totp SET confirmed_at = now(), last_used_step = $2 WHERE user_id = $1",
            &[&p.user_id, &(step as i64)],
        )
        .await?;
        tx.typed_execute(
            "DELETE FROM dalp_identity.mfa_backup_codes WHERE user_id = $1",
            &[&p.user_id],
        )
        .await?;
        for c in &codes {
            tx.typed_execute(
                "INSERT INTO dalp_identity.mfa_backup_codes (user_id, code_hash) VALUES ($1, $2)",
                &[&p.user_id, &totp::hash_backup_code(c)],
            )
            .await?;
        }
        Self::complete_pending(&tx, p).await?;
        tx.record(
            &ctx.event("identity.mfa.confirm", "user")
                .resource(p.user_id),
        )
        .await?;
        tx.invalidate(p.tags());
        tx.commit().await?;
        Ok(codes)
    }

    async fn complete_pending(tx: &Transaction<'_>, p: &Principal) -> Result<()> {
        if let Credential::Session {
            id,
            mfa_pending: true,
            ..
        } = &p.credential
        {
            let now = Utc::now();
            tx.typed_execute(
                "UPDATE dalp_identity.sessions SET mfa_pending = false, expires_at = $2, refreshed_at = $3, fresh_until = $4 WHERE id = $1",
                &[id, &(now + SESSION_TTL), &now, &(now + FRESH_FOR)],
            )
            .await?;
            tx.typed_execute(
                "UPDATE dalp_identity.users SET last_login_at = now() WHERE id = $1",
                &[&p.user_id],
            )
            .await?;
        }
        Ok(())
    }

    /// Completes a pending session with a TOTP code or an unused backup code.
    #[tracing::instrument(target = "dalp_store", name = "identity.verify_mfa", skip_all)]
    pub async fn verify_mfa(&self, ctx: &RequestContext, p: &Principal, code: &str) -> Result<()> {
        let Credential::Session {
            mfa_pending: true, ..
        } = &p.credential
        else {
            return Err(IdentityError::Conflict(
                "this session needs no second factor".into(),
            ));
        };
        let Credential::Session { id: session, .. } = &p.credential else {
            unreachable!("matched above")
        };
        let totp_state = self.load_totp(p.user_id).await?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.verify_mfa").await?;
        // Attempts of one user are serialised on their lockout row, so concurrent guesses
        // cannot slip past the limit; the limit holds for every API process.
        tx.typed_execute(
            "INSERT INTO dalp_identity.mfa_lockouts (user_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&p.user_id],
        )
        .await?;
        let until: Option<DateTime<Utc>> = tx
            .typed_query_one(
                "SELECT locked_until FROM dalp_identity.mfa_lockouts WHERE user_id = $1 FOR UPDATE",
                &[&p.user_id],
            )
            .await?
            .get::<_, Option<DateTime<Utc>>>(0)
            .filter(|u| *u > Utc::now());
        if let Some(until) = until {
            drop(tx);
            self.audit_alone(
                ctx.event("identity.mfa.verify", "user")
                    .outcome(Outcome::Denied)
                    .details(json!({ "reason": "locked", "locked_until": until })),
                Some(p.user_id),
            )
            .await?;
            return Err(IdentityError::MfaLocked { until });
        }
        let mut method = None;
        if let Some((secret, true, last)) = &totp_state {
            if let Some(step) = totp::verify(
                secret,
                code.trim(),
                Utc::now().timestamp() as u64,
                *last as u64,
            ) {
                // Conditional on the step, so two concurrent uses of one code cannot both pass.
                let n = tx
                    .typed_execute(
                        "UPDATE dalp_identity.mfa_totp SET last_used_step = $2 WHERE user_id = $1 AND last_used_step < $2",
                        &[&p.user_id, &(step as i64)],
                    )
                    .await?;
                if n == 1 {
                    method = Some("totp");
                }
            }
        }
        if method.is_none() {
            let n = tx
                .typed_execute(
                    "UPDATE dalp_identity.mfa_backup_codes SET used_at = now() WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
                    &[&p.user_id, &totp::hash_backup_code(code)],
                )
                .await?;
            if n == 1 {
                method = Some("backup_code");
            }
        }
        let Some(method) = method else {
            return self.mfa_failure(ctx, tx, p, *session).await;
        };
        tx.typed_execute(
            "DELETE FROM dalp_identity.mfa_lockouts WHERE user_id = $1",
            &[&p.user_id],
        )
        .await?;
        Self::complete_pending(&tx, p).await?;
        tx.record(
            &ctx.event("identity.mfa.verify", "user")
                .resource(p.user_id)
                .details(json!({ "method": method })),
        )
        .await?;
        tx.invalidate(p.tags());
        tx.commit().await?;
        Ok(())
    }

    /// Counts a wrong second-factor code in `tx` (which holds the user's lockout row):
    /// audits it, revokes the session at its last attempt and locks the user out after
    /// [`MFA_USER_ATTEMPTS`] in a row. Always an error.
    async fn mfa_failure(
        &self,
        ctx: &RequestContext,
        mut tx: Write<'_>,
        p: &Principal,
        session: Uuid,
    ) -> Result<()> {
        let session_failures: i32 = tx
            .typed_query_one(
                "UPDATE dalp_identity.sessions SET mfa_failures = mfa_failures + 1 WHERE id = $1 RETURNING mfa_failures",
                &[&session],
            )
            .await?
            .get(0);
        let row = tx
            .typed_query_one(
                "UPDATE dalp_identity.mfa_lockouts SET failures = failures + 1, updated_at = now()
                  WHERE user_id = $1 RETURNING failures, lockouts",
                &[&p.user_id],
            )
            .await?;
        let (failures, lockouts): (i32, i32) = (row.get(0), row.get(1));
        let mut details = json!({ "reason": "invalid_code", "session_failures": session_failures, "user_failures": failures });
        let mut tags = Vec::new();
        if failures >= MFA_USER_ATTEMPTS {
            let minutes = (1i64 << lockouts.min(20)).min(MFA_MAX_LOCKOUT_MINUTES);
            let until: DateTime<Utc> = tx
                .typed_query_one(
                    "UPDATE dalp_identity.mfa_lockouts
                        SET failures = 0, lockouts = lockouts + 1,
                            locked_until = now() + $2 * interval '1 minute', updated_at = now()
                      WHERE user_id = $1 RETURNING locked_until",
                    &[&p.user_id, &(minutes as f64)],
                )
                .await?
                .get(0);
            tx.record(&ctx.event("identity.mfa.lockout", "user")
                    .resource(p.user_id)
                    .outcome(Outcome::Denied)
                    .details(json!({ "locked_until": until, "minutes": minutes, "lockout": lockouts + 1 })),
            )
            .await?;
            details["locked_until"] = json!(until);
        }
        let revoked = session_failures >= MFA_SESSION_ATTEMPTS;
        if revoked {
            tx.typed_execute(
                "UPDATE dalp_identity.sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                &[&session],
            )
            .await?;
            tx.record(
                &ctx.event("identity.session.revoke", "session")
                    .resource(session)
                    .details(json!({ "reason": "too many wrong second-factor codes" })),
            )
            .await?;
            tags.push(format!("session:{session}"));
        }
        tx.record(
            &ctx.event("identity.mfa.verify", "user")
                .resource(p.user_id)
                .outcome(Outcome::Denied)
                .details(details),
        )
        .await?;
        tx.invalidate(tags);
        tx.commit().await?;
        Err(if revoked {
            IdentityError::MfaSessionRevoked
        } else {
            IdentityError::InvalidCode
        })
    }

    // ---- API keys ---------------------------------------------------------------------

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

    // ---- KYC --------------------------------------------------------------------------

    /// Writes a user's KYC profile, encrypted under a fresh data key.
    #[tracing::instrument(target = "dalp_store", name = "identity.put_kyc", skip_all)]
    pub async fn put_kyc(
        &self,
        ctx: &RequestContext,
        user_id: Uuid,
        profile: &KycProfile,
    ) -> Result<()> {
        profile.validate()?;
        let dek = crypto::new_dek();
        let wrapped = self.keys.wrap(&dek).await?;
        let plaintext = serde_json::to_vec(profile).expect("KYC profile serializes");
        let enc = crypto::seal(&dek, &plaintext, kyc_aad(user_id).as_bytes());
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.put_kyc").await?;
        if tx
            .typed_query_opt(
                "SELECT 1 FROM dalp_identity.users WHERE id = $1",
                &[&user_id],
            )
            .await?
            .is_none()
        {
            return Err(IdentityError::NotFound("user"));
        }
        let old: Option<Uuid> = tx
            .typed_query_opt(
                "SELECT data_key_id FROM dalp_identity.kyc_profiles WHERE user_id = $1 FOR UPDATE",
                &[&user_id],
            )
            .await?
            .map(|r| r.get(0));
        let dk: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.data_keys (kek_id, wrapped) VALUES ($1, $2) RETURNING id",
                &[&wrapped.kek_id, &wrapped.blob],
            )
            .await?
            .get(0);
        tx.typed_execute(
            "INSERT INTO dalp_identity.kyc_profiles (user_id, data_key_id, payload_enc, updated_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id) DO UPDATE SET data_key_id = EXCLUDED.data_key_id, payload_enc = EXCLUDED.payload_enc,
                 updated_at = now(), updated_by = EXCLUDED.updated_by",
            &[&user_id, &dk, &enc, &ctx.actor],
        )
        .await?;
        if let Some(old) = old {
            tx.typed_execute("DELETE FROM dalp_identity.data_keys WHERE id = $1", &[&old])
                .await?;
        }
        tx.record(&ctx.event("identity.kyc.write", "kyc_profile")
                .resource(user_id)
                .details(json!({ "fields": ["first_name", "last_name", "date_of_birth", "country", "residency_status", "national_id"] })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Reads and decrypts a KYC profile; the read itself is audited in the same transaction.
    #[tracing::instrument(target = "dalp_store", name = "identity.get_kyc", skip_all)]
    pub async fn get_kyc(&self, ctx: &RequestContext, user_id: Uuid) -> Result<KycProfile> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.get_kyc").await?;
        let row = tx
            .typed_query_opt(
                "SELECT d.kek_id, d.wrapped, k.payload_enc FROM dalp_identity.kyc_profiles k
                   JOIN dalp_identity.data_keys d ON d.id = k.data_key_id WHERE k.user_id = $1",
                &[&user_id],
            )
            .await?
            .ok_or(IdentityError::NotFound("KYC profile"))?;
        let dek = self
            .keys
            .unwrap(&WrappedKey {
                kek_id: row.get(0),
                blob: row.get(1),
            })
            .await?;
        let plaintext = crypto::open(&dek, row.get::<_, &[u8]>(2), kyc_aad(user_id).as_bytes())?;
        let profile: KycProfile = serde_json::from_slice(&plaintext)
            .map_err(|_| IdentityError::Crypto(CryptoError::Decrypt))?;
        tx.record(
            &ctx.event("identity.kyc.read", "kyc_profile")
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        Ok(profile)
    }

    // ---- keys -------------------------------------------------------------------------

    /// Makes a new KEK active and re-wraps every data key under it, in small batches;
    /// readers keep working throughout because old KEKs stay available.
    #[tracing::instrument(target = "dalp_store", name = "identity.rotate_keys", skip_all)]
    pub async fn rotate_keys(
        &self,
        ctx: &RequestContext,
        on_progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<RotationReport> {
        let active = self.keys.rotate().await?;
        let mut conn = self.writer.checkout().await?;
        let total: i64 = conn
            .typed_query_one(
                "SELECT count(*) FROM dalp_identity.data_keys WHERE kek_id <> $1",
                &[&active],
            )
            .await?
            .get(0);
        let mut done = 0u64;
        loop {
            let tx = conn.begin("identity.rotate_keys").await?;
            let rows = tx
                .typed_query(
                    "SELECT id, kek_id, wrapped FROM dalp_identity.data_keys WHERE kek_id <> $1
                      ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED",
                    &[&active],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let dek = self
                    .keys
                    .unwrap(&WrappedKey {
                        kek_id: r.get(1),
                        blob: r.get(2),
                    })
                    .await?;
                let w = self.keys.wrap(&dek).await?;
                tx.typed_execute(
                    "UPDATE dalp_identity.data_keys SET kek_id = $2, wrapped = $3, rotated_at = now() WHERE id = $1",
                    &[&r.get::<_, Uuid>(0), &w.kek_id, &w.blob],
                )
                .await?;
            }
            done += rows.len() as u64;
            tx.commit_unaudited(
                "re-wrapping a batch of data keys; the rotation is audited once it is complete",
            )
            .await?;
            on_progress(done, total as u64);
        }
        let mut tx = conn.begin("identity.rotate_keys").await?;
        tx.record(
            &ctx.event("identity.keys.rotate", "key_encryption_key")
                .resource(&active)
                .details(json!({ "rewrapped": done })),
        )
        .await?;
        tx.commit().await?;
        Ok(RotationReport {
            active_kek: active,
            rewrapped: done,
        })
    }
}

fn kyc_aad(user_id: Uuid) -> String {
    format!("dalp_identity.kyc_profiles:{user_id}")
}

fn totp_aad(user_id: Uuid) -> String {
    format!("dalp_identity.mfa_totp:{user_id}")
}
