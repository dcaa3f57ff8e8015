//! Our JSON body extractor: rejections come back in the one error shape, with 400 for
//! malformed JSON, 413 for oversized bodies, 415 for a wrong content type and 422 for a body
//! of the wrong shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::ApiError;

pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::Unsupported(
                "send Content-Type: application/json".into(),
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::TooLarge)
            }
            Err(r) => {
                return Err(ApiError::BadRequest(format!(
                    "unreadable body: {}",
                    r.body_text()
                )))
            }
        };
        // PostgreSQL text cannot hold U+0000: refuse it here, for every field and every
        // free-form JSON payload, instead of failing deep in a store.
        if has_nul_escape(&bytes) {
            return Err(ApiError::Unprocessable(
                "text must not contain U+0000 (NUL), in any field or nested JSON value".into(),
            ));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Json(v)),
            // JSON has one number type: `27.0` is the integer 27 (as JSON Schema's `integer`
            // says). Only a body that failed on such a number pays for the second pass.
            Err(JsonRejection::JsonDataError(e))
                if e.body_text().contains("invalid type: floating point") =>
            {
                let mut value: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
                integral_floats_to_integers(&mut value);
                serde_json::from_value(value)
                    .map(Json)
                    .map_err(|e| ApiError::Unprocessable(format!("invalid body: {e}")))
            }
            Err(rejection) => Err(match rejection.status() {
                StatusCode::UNPROCESSABLE_ENTITY => match &rejection {
                    JsonRejection::JsonDataError(e) => ApiError::Unprocessable(e.body_text()),
                    _ => ApiError::Unprocessable(rejection.body_text()),
                },
                // serde_json reports some type mismatches (`{}` where an enum's string is
                // due) as syntax errors: well-formed JSON is the wrong shape, not malformed.
                _ if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() => {
                    ApiError::Unprocessable(format!("invalid body: {}", rejection.body_text()))
                }
                _ => ApiError::BadRequest(format!("malformed JSON: {}", rejection.body_text())),
            }),
        }
    }
}

/// Rewrites every number with no fractional part (`27.0`, `1e3`) that fits an `i64` as that
/// integer.
fn integral_floats_to_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(o) => o.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

/// `application/json` or `application/*+json`, as axum's own extractor accepts.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Whether a JSON text encodes U+0000 (`\u0000`; a raw NUL byte is malformed JSON anyway).
/// Escapes are skipped whole, so an escaped backslash followed by `u0000` is not one.
pub(crate) fn has_nul_escape(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'\\' {
            if json.get(i + 1) == Some(&b'u') {
                if json.get(i + 2..i + 6) == Some(b"0000".as_slice()) {
                    return true;
                }
                i += 6;
            } else {
                i += 2;
            }
        } else {
            i += 1;
        }
    }
    false
}

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::has_nul_escape;

    #[test]
    fn finds_encoded_nul_only_where_it_is_one() {
        assert!(has_nul_escape(br#"{"name":"a\u0000b"}"#));
        assert!(has_nul_escape(br#"{"x":{"y":["\u0000"]}}"#));
        assert!(
            !has_nul_escape(br#"{"name":"a\\u0000b"}"#),
            "an escaped backslash"
        );
        assert!(!has_nul_escape(br#"{"name":"\u00e9\n"}"#));
        assert!(has_nul_escape(br#"{"k\u0000":1}"#), "keys too");
    }
}
