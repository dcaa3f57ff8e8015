//! The one error type handlers return, and the one JSON shape clients see:
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dalp_assets::AssetError;
use dalp_identity::IdentityError;
use dalp_indexed::IndexError;
use dalp_workflows::WorkflowError;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("this endpoint does not take that method (see GET /api/v1/openapi.json)")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than the server accepts")]
    TooLarge,
    #[error(
        "request headers are too many or too large (at most {} fields, {} bytes)",
        crate::MAX_HEADERS,
        crate::MAX_HEADER_BYTES
    )]
    HeadersTooLarge,
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("internal error")]
    Internal(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error("{0}")]
    PreconditionRequired(String),
    #[error(transparent)]
    Indexed(#[from] IndexError),
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
}

/// The one error shape: `{"error": {"code", "message", "field"?}}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub(crate) struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorDetail)]
pub(crate) struct Detail<'a> {
    /// Machine-readable: `invalid`, `not_found`, `version_conflict`, `rate_limited`, ...
    code: &'a str,
    /// What went wrong and what to do next.
    message: String,
    /// The offending field, for validation failures (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use IdentityError as I;
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::Unsupported(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::PreconditionRequired(_) => {
                (StatusCode::PRECONDITION_REQUIRED, "precondition_required")
            }
            ApiError::Asset(e) => match e {
                AssetError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
                AssetError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                AssetError::Conflict { .. } => (StatusCode::CONFLICT, "version_conflict"),
                AssetError::Duplicate(_) => (StatusCode::CONFLICT, "conflict"),
                AssetError::FourEyes => (StatusCode::FORBIDDEN, "four_eyes"),
                AssetError::TemplatePublished(_) => (StatusCode::CONFLICT, "template_published"),
                AssetError::NotPending(_) => (StatusCode::CONFLICT, "not_pending"),
                AssetError::Pool(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                AssetError::Db(_) | AssetError::Internal(_) | AssetError::Write(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            },
            ApiError::Indexed(e) => match e {
                IndexError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
                IndexError::UnknownChain(_) | IndexError::NotFound(_) => {
                    (StatusCode::NOT_FOUND, "not_found")
                }
                IndexError::ChainConflict(_) => (StatusCode::CONFLICT, "conflict"),
                IndexError::Gap { .. } => (StatusCode::CONFLICT, "gap"),
                IndexError::ParentMismatch { .. } => (StatusCode::CONFLICT, "parent_mismatch"),
                IndexError::DeepReorg { .. } => (StatusCode::CONFLICT, "reorg_too_deep"),
                IndexError::NotIndexedYet { .. } => (StatusCode::CONFLICT, "not_indexed_yet"),
                IndexError::Diverged { .. } => (StatusCode::CONFLICT, "chain_diverged"),
                IndexError::Pool(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                IndexError::Db(_) | IndexError::Write(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            },
            ApiError::Workflow(e) => match e {
                WorkflowError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
                WorkflowError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                WorkflowError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                WorkflowError::LeaseLost(_) => (StatusCode::CONFLICT, "lease_lost"),
                WorkflowError::IllegalTransition { .. } => {
                    (StatusCode::CONFLICT, "illegal_transition")
                }
                WorkflowError::Pool(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                WorkflowError::Db(_) | WorkflowError::Write(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            },
            ApiError::Identity(e) => match e {
                I::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
                I::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
                I::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
                I::InvalidCode => (StatusCode::UNAUTHORIZED, "invalid_code"),
                I::MfaSessionRevoked => (StatusCode::UNAUTHORIZED, "session_revoked"),
                I::MfaLocked { .. } => (StatusCode::TOO_MANY_REQUESTS, "mfa_locked"),
                I::Reauthenticate => (StatusCode::UNAUTHORIZED, "reauthentication_required"),
                I::MfaRequired => (StatusCode::FORBIDDEN, "mfa_required"),
                I::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                I::Banned { .. } => (StatusCode::FORBIDDEN, "banned"),
                I::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                I::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                I::Pool(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                I::Crypto(_) | I::Db(_) | I::Hashing(_) | I::Write(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            // Logged here, where it is handled; the client learns nothing internal.
            tracing::error!(error = %cause_chain(&self), "request failed");
            "internal error".to_string()
        } else {
            self.to_string()
        };
        let retry_after = match &self {
            ApiError::Identity(IdentityError::MfaLocked { until }) => {
                Some((*until - chrono::Utc::now()).num_seconds().max(1))
            }
            _ => None,
        };
        let mut r = (
            status,
            Json(Body {
                error: Detail {
                    code,
                    message,
                    field: self.field(),
                },
            }),
        )
            .into_response();
        if let Some(secs) = retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

impl ApiError {
    /// The field a validation failure is about.
    fn field(&self) -> Option<&'static str> {
        match self {
            ApiError::Identity(IdentityError::Invalid(i)) => Some(i.field),
            ApiError::Asset(AssetError::Invalid(i)) => Some(i.field),
            ApiError::Indexed(IndexError::Invalid(i)) => Some(i.field),
            ApiError::Workflow(WorkflowError::Invalid(i)) => Some(i.field),
            _ => None,
        }
    }

    /// The error response, carrying the request id header.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let mut r = self.into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(request_id) {
            r.headers_mut().insert("x-request-id", v);
        }
        r
    }
}

pub use dalp_db::connect::cause_chain;
