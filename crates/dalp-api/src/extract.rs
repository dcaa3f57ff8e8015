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
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
                StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                    ApiError::Unsupported("send Content-Type: application/json".into())
                }
                StatusCode::UNPROCESSABLE_ENTITY => match &rejection {
                    JsonRejection::JsonDataError(e) => ApiError::Unprocessable(e.body_text()),
                    _ => ApiError::Unprocessable(rejection.body_text()),
                },
                _ => ApiError::BadRequest(format!("malformed JSON: {}", rejection.body_text())),
            }),
        }
    }
}

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}
