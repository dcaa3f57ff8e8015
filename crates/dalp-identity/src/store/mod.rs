//! The only code that touches `dalp_identity`, one module per concern (users, organisations,
//! sessions, MFA, API keys, KYC, key rotation). Every change goes through the store's
//! [`Writer`]: it commits together with its audit record and sends at most one cache
//! notification from inside its transaction.

mod api_keys;
mod keys;
mod kyc;
mod mfa;
mod orgs;
mod sessions;
mod users;

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

/// What the identity cache holds: resolved credentials (keyed by token hash, tagged with
/// their user and session or key) and user profiles (keyed and tagged `user:<id>`). Every
/// change to a user invalidates `user:<id>`, which evicts both.
#[derive(Debug, Clone)]
pub enum Cached {
    Principal(Principal),
    User(User),
}

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
    cache: Arc<InvalidatingCache<Cached>>,
}

impl IdentityStore {
    pub fn new(
        pool: Pool,
        keys: Arc<dyn KeyProvider>,
        cache: Arc<InvalidatingCache<Cached>>,
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

    pub fn cache(&self) -> &Arc<InvalidatingCache<Cached>> {
        &self.cache
    }
}

fn kyc_aad(user_id: Uuid) -> String {
    format!("dalp_identity.kyc_profiles:{user_id}")
}

fn totp_aad(user_id: Uuid) -> String {
    format!("dalp_identity.mfa_totp:{user_id}")
}
