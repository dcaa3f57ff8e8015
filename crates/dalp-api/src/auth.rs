//! Who is calling: `Authorization: Bearer <session token>` or `X-Api-Key: <key>`. API keys
//! are rate-limited per key and `read` keys may only use safe methods; sessions still
//! waiting for their second factor are refused everywhere but the MFA routes.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::Method;
use dalp_identity::store::Credential;
use dalp_identity::types::{PlatformRole, Scope};
use dalp_identity::{IdentityError, Principal, RequestContext};

use crate::{ApiError, AppState};

/// Request context without authentication (login).
pub struct Ctx(pub RequestContext);

fn context(parts: &Parts, actor: String) -> RequestContext {
    let ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let header = |name: &str, max: usize| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= max && v.chars().all(|c| !c.is_control()))
            .map(str::to_string)
    };
    RequestContext {
        actor,
        ip,
        user_agent: header("user-agent", 512),
        request_id: header("x-request-id", 100).or_else(|| Some(uuid::Uuid::new_v4().to_string())),
    }
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Ctx(context(parts, "anonymous".into())))
    }
}

/// A fully authenticated caller.
pub struct Auth {
    pub principal: Principal,
    pub ctx: RequestContext,
}

/// A caller whose session may still be waiting for its second factor.
pub struct PendingAuth(pub Auth);

async fn authenticate(
    parts: &Parts,
    state: &AppState,
    allow_pending: bool,
) -> Result<Auth, ApiError> {
    let bearer = parts
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap_or_default())
        .map(|v| {
            v.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
                ApiError::Unauthenticated("Authorization must be `Bearer <token>`".into())
            })
        })
        .transpose()?;
    let api_key = parts
        .headers
        .get("x-api-key")
        .map(|v| v.to_str().unwrap_or_default().trim());
    let principal =
        match (bearer, api_key) {
            (Some(t), None) => state.identity.validate_session(t).await?,
            (None, Some(k)) => state.identity.validate_api_key(k).await?,
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "send either a bearer token or an API key, not both".into(),
                ))
            }
            (None, None) => return Err(ApiError::Unauthenticated(
                "missing credentials: send `Authorization: Bearer <token>` or `X-Api-Key: <key>`"
                    .into(),
            )),
        };
    let ctx = context(parts, principal.actor());
    if let Some(slot) = parts.extensions.get::<crate::request_audit::ActorSlot>() {
        slot.set(principal.actor());
    }
    match &principal.credential {
        Credential::Session {
            mfa_pending: true, ..
        } if !allow_pending => {
            return Err(IdentityError::MfaRequired.into());
        }
        Credential::ApiKey {
            id,
            scope,
            rate_limit_per_minute,
            ..
        } => {
            if !state
                .limits
                .allow(&format!("key:{id}"), *rate_limit_per_minute as u32)
            {
                return Err(ApiError::TooManyRequests(format!(
                    "this API key allows {rate_limit_per_minute} requests per minute"
                )));
            }
            let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if *scope == Scope::Read && !safe {
                let _ = state
                    .identity
                    .audit_denied(&ctx, "api.request", "read-only API key")
                    .await;
                return Err(ApiError::Forbidden(
                    "this API key is read-only (scope `read`)".into(),
                ));
            }
        }
        _ => {}
    }
    Ok(Auth { principal, ctx })
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(parts, state, false).await
    }
}

impl FromRequestParts<AppState> for PendingAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(PendingAuth(authenticate(parts, state, true).await?))
    }
}

impl Auth {
    /// Refuses (and audits the refusal) unless the caller holds `role`.
    pub async fn require_role(
        &self,
        state: &AppState,
        role: PlatformRole,
        action: &'static str,
    ) -> Result<(), ApiError> {
        self.require_any_role(state, &[role], action).await
    }

    /// Refuses (and audits the refusal) unless the caller holds one of `roles`.
    pub async fn require_any_role(
        &self,
        state: &AppState,
        roles: &[PlatformRole],
        action: &'static str,
    ) -> Result<(), ApiError> {
        if roles.iter().any(|r| self.principal.has_role(*r)) {
            return Ok(());
        }
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        let _ = state
            .identity
            .audit_denied(
                &self.ctx,
                action,
                &format!("missing role {}", names.join(" or ")),
            )
            .await;
        Err(ApiError::Forbidden(format!(
            "this needs the `{}` role",
            names.join("` or `")
        )))
    }
}
