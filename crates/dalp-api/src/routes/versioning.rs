//! Optimistic concurrency over HTTP for every versioned record: reads answer with
//! `ETag: "N"` (the record's version); changes must send `If-Match: "N"` back — 428 without
//! it, 409 from the store when the record has moved on.

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::extract::Json;
use crate::ApiError;

/// `body` with the record's version as its ETag.
pub(crate) fn with_etag<T: serde::Serialize>(
    status: StatusCode,
    version: i32,
    body: T,
) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert("etag", v);
    }
    r
}

/// The version the client read, from `If-Match: "N"`.
pub(crate) fn if_match(headers: &HeaderMap) -> Result<i32, ApiError> {
    let v = headers.get("if-match").ok_or_else(|| {
        ApiError::PreconditionRequired(
            "send If-Match with the ETag of the version you read (\"0\" when nothing was saved yet)".into(),
        )
    })?;
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ApiError::BadRequest("If-Match must be the ETag of a read, e.g. \"3\"".into())
        })
}

/// The `If-Match` request header of every change to a versioned record.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // describes a header; read by `if_match`
pub(crate) struct IfMatch {
    /// The ETag of the version read (`"0"` before the first save); 428 without it, 409 when
    /// the record has moved on.
    #[param(rename = "If-Match", pattern = "^\"[0-9]{1,9}\"$")]
    if_match: String,
}
